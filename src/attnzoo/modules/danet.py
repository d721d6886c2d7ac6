"""Position attention (PAM), channel attention (CAM) and their sum, from DANet.

Fu, Liu, Tian, Li, Bao, Fang, Lu, "Dual Attention Network for Scene Segmentation", CVPR 2019.
Official code: https://github.com/junfu1115/DANet (``encoding/nn/da_att.py``: ``PAM_Module``,
``CAM_Module``; ``encoding/models/sseg/danet.py``: ``DANetHead``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from attnzoo.ops import pairwise
from attnzoo.ops.pairwise import from_positions, softmax_affinity, to_positions
from attnzoo.ops.query import Query, pixel_pair_map
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = [
    "DANetPositionAttention",
    "DANetChannelAttention",
    "DualAttention",
    "pam_param_count",
    "cam_param_count",
    "dual_attention_param_count",
]

CAM_ENERGIES = ("rowmax_minus", "plain")
FUSIONS = ("residual", "sum")

_META: dict[str, Any] = dict(
    family="pixel-pair",
    paper="Dual Attention Network for Scene Segmentation",
    venue="CVPR",
    year=2019,
    code="https://github.com/junfu1115/DANet",
    spatial_dims=2,
    example_channels=64,
    identity_at_init=True,
)


def _check_pam(name: str, channels: int, reduction: int) -> int:
    check_positive_int(name, "channels", channels)
    check_positive_int(name, "reduction", reduction)
    return max(1, channels // reduction)


def pam_param_count(channels: int, *, reduction: int = 8) -> int:
    """Parameters of :class:`DANetPositionAttention`: ``2 (C d + d) + C^2 + C + 1``,
    ``d = max(1, C // reduction)``."""
    d = _check_pam("DANetPositionAttention", channels, reduction)
    return 2 * (channels * d + d) + channels * channels + channels + 1


def cam_param_count(channels: int, *, energy: str = "rowmax_minus") -> int:
    """Parameters of :class:`DANetChannelAttention`: only ``gamma`` (1)."""
    check_positive_int("DANetChannelAttention", "channels", channels)
    check_choice("DANetChannelAttention", "energy", energy, CAM_ENERGIES)
    return 1


def dual_attention_param_count(
    channels: int, *, reduction: int = 8, energy: str = "rowmax_minus", fusion: str = "residual"
) -> int:
    """Parameters of :class:`DualAttention`: PAM's plus CAM's."""
    check_choice("DualAttention", "fusion", fusion, FUSIONS)
    return pam_param_count(channels, reduction=reduction) + cam_param_count(channels, energy=energy)


@register("pam", presets={}, param_count=pam_param_count, **_META)
class DANetPositionAttention(nn.Module):
    """DANet position attention module (PAM): ``out = x + gamma * o`` (Fu et al., "Dual Attention
    Network for Scene Segmentation", CVPR 2019).

    Equation in words: ``B = W_q x`` and ``C = W_k x`` (1x1 convs ``C -> C // 8``, with bias),
    ``D = W_v x`` (``C -> C``, with bias); ``s_ji = softmax_i(B_j . C_i)`` (no scaling);
    ``o_j = sum_i s_ji D_i``; ``out = gamma * o + x`` with ``gamma`` starting at 0 (identity at
    initialisation). The same maths as SAGAN's PyTorch layer (the authors' comment: "Ref from
    SAGAN").

    Shapes: ``(B, C, H, W)`` -> same shape, dtype and memory format; ``C // 8`` is at least 1.
    ``forward`` calls :func:`torch.nn.functional.scaled_dot_product_attention` with
    ``scale=1.0``: memory is O(N C), not the O(N^2) of the official code (users report 14.5 GB
    for training at Cityscapes scale with it). Double backward: automatic in float64; in float32
    under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (see :mod:`attnzoo.ops.pairwise`).

    Args:
        channels: input channels ``C``.
        reduction: query/key reduction, 8 in the official code.

    Attention for visualisation: :meth:`attention_map` returns ``s`` ``(B, N, N)``.
    """

    def __init__(self, channels: int, *, reduction: int = 8) -> None:
        super().__init__()
        d = _check_pam(type(self).__name__, channels, reduction)
        self.channels = channels
        self.reduction = reduction
        self.query_conv = nn.Conv2d(channels, d, kernel_size=1)
        self.key_conv = nn.Conv2d(channels, d, kernel_size=1)
        self.value_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def _check(self, x: torch.Tensor) -> None:
        check_input(type(self).__name__, x, self.channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output ``o`` before ``gamma`` and the residual, ``(B, C, H, W)``."""
        q = to_positions(self.query_conv(x))
        k = to_positions(self.key_conv(x))
        v = to_positions(self.value_conv(x))
        return from_positions(pairwise.softmax_attention(q, k, v, scale=1.0), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x + (self.gamma * self.attend(x)).to(x.dtype)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """``s`` of shape ``(B, N, N)``, ``N = H*W`` row-major; rows sum to 1."""
        rows, _ = self.affinity_rows(x)
        return rows(slice(None))

    @torch.no_grad()
    def affinity_rows(
        self, x: torch.Tensor
    ) -> tuple[Callable[[slice], torch.Tensor], tuple[int, ...]]:
        """``(rows, key_shape)``: ``rows(queries)`` gives the rows of :meth:`attention_map` for a
        slice of the ``N`` query positions, ``(B, n, N)``; ``key_shape`` is ``(H, W)``."""
        self._check(x)
        q = to_positions(self.query_conv(x))
        k = to_positions(self.key_conv(x))
        return (lambda sl: softmax_affinity(q[:, sl], k, scale=1.0)), tuple(x.shape[2:])

    #: the maps depend on ``query`` (see :mod:`attnzoo.ops.query`)
    attention_query: ClassVar[bool] = True

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``{"spatial": (B, H, W)}``: the row of ``query=(y, x)`` (or fractions in ``[0, 1]``) of
        :meth:`attention_map` on the key grid, or (``"mean"``) the mean over all query rows;
        computed from :meth:`affinity_rows`, never the ``N x N`` matrix (:mod:`attnzoo.ops.query`).
        """
        rows, keys = self.affinity_rows(x)
        where = f"{type(self).__name__}.attention_maps"
        return {"spatial": pixel_pair_map(rows, keys, x, query, where)}

    def extra_repr(self) -> str:
        return f"{self.channels}, reduction={self.reduction}"


def _channel_attention(feats: torch.Tensor, energy: str) -> torch.Tensor:
    """CAM's ``A`` from ``X`` ``(B, C, N)`` (already in the accumulation dtype)."""
    # bmm, not matmul: matmul may copy the transposed operand to fold batch dimensions
    e = torch.bmm(feats, feats.transpose(1, 2))
    if energy == "rowmax_minus":
        e = e.amax(dim=-1, keepdim=True) - e
    return torch.softmax(e, dim=-1)


def _channel_mix(x: torch.Tensor, energy: str) -> torch.Tensor:
    """CAM's ``A X`` for ``x`` ``(B, C, *spatial)``, accumulated in at least float32 with autocast
    off, returned in ``x``'s dtype. An FX leaf: the autocast region needs the concrete device."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    device = x.device.type
    # devices without autocast (meta: shape inference) have nothing to switch off
    no_autocast = (
        torch.autocast(device, enabled=False)
        if torch.amp.is_autocast_available(device)
        else contextlib.nullcontext()
    )
    with no_autocast:
        feats = x.flatten(2).to(dtype)
        out = torch.bmm(_channel_attention(feats, energy), feats)
    return out.to(x.dtype).unflatten(2, x.shape[2:])


torch.fx.wrap("_channel_mix")


@register("cam", presets={"plain": {"energy": "plain"}}, param_count=cam_param_count, **_META)
class DANetChannelAttention(nn.Module):
    """DANet channel attention module (CAM): ``out = x + gamma * (A X)`` (Fu et al., "Dual
    Attention Network for Scene Segmentation", CVPR 2019).

    Equation in words: with ``X`` the input reshaped to ``(C, N)``, the channel energy is
    ``E = X X^T`` ``(C, C)``; the attention is ``A = softmax(rowmax(E) - E)`` along each row
    (``energy="rowmax_minus"``, the authors' code) or ``softmax(E)`` (``energy="plain"``, the
    paper's Eq. (3); the authors report it did worse). Because a softmax is invariant to a per-row
    shift, the authors' form equals ``softmax(-E)``: it favours *dissimilar* channels.
    ``out = gamma * (A X) + x``, ``gamma`` starting at 0 (identity at initialisation). No convs.

    Shapes: ``(B, C, H, W)`` -> same shape, dtype and memory format. The ``(B, C, C)`` energy is
    small and is computed directly; it is accumulated in at least float32 (also under autocast):
    ``X X^T`` sums ``N`` products, whose rounding in bfloat16/float16 (or overflow, in float16)
    would otherwise decide a near one-hot softmax.

    Args:
        channels: input channels ``C`` (no parameters depend on it but the check of the input).
        energy: ``"rowmax_minus"`` (default, authors' code) or ``"plain"``.

    Attention for visualisation: :meth:`attention_map` returns ``A`` ``(B, C, C)``.
    """

    def __init__(self, channels: int, *, energy: str = "rowmax_minus") -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "channels", channels)
        check_choice(name, "energy", energy, CAM_ENERGIES)
        self.channels = channels
        self.energy = energy
        self.gamma = nn.Parameter(torch.zeros(1))

    def _check(self, x: torch.Tensor) -> None:
        check_input(type(self).__name__, x, self.channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """``A X`` before ``gamma`` and the residual, ``(B, C, H, W)``, in ``x``'s dtype."""
        return _channel_mix(x, self.energy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x + (self.gamma * self.attend(x)).to(x.dtype)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """``A`` of shape ``(B, C, C)``; rows sum to 1."""
        self._check(x)
        return _channel_attention(
            x.flatten(2).to(torch.promote_types(x.dtype, torch.float32)), self.energy
        )

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``channel_affinity`` ``(B, C, C)``: ``A`` (rows: output channel, sum to 1);
        ``channel`` ``(B, C)``: ``A.mean(1)``, the weight each channel gets as a source, averaged
        over output channels. ``query`` is ignored."""
        a = self.attention_map(x)
        return {"channel_affinity": a, "channel": a.mean(1)}

    def extra_repr(self) -> str:
        return f"{self.channels}, energy={self.energy!r}"


@register(
    "dual_attention",
    presets={"sum": {"fusion": "sum"}},
    param_count=dual_attention_param_count,
    **_META,
)
class DualAttention(nn.Module):
    """DANet's position and channel attention on the same input, summed (Fu et al., "Dual
    Attention Network for Scene Segmentation", CVPR 2019).

    What is summed. In the DANet head each branch has its own 3x3 conv-BN-ReLU before (``C ->
    C/4``) and after the attention module, and the head adds the two branch outputs
    (``feat_sum = conv51(PAM(conv5a(x))) + conv52(CAM(conv5c(x)))``); each branch carries its own
    residual. As a drop-in module with ``C`` channels in and out and no extra convs:

    - ``fusion="residual"`` (default): ``out = x + gamma_p * o_pam + gamma_c * o_cam``
      ``= PAM(x) + CAM(x) - x``. The input is counted once, so the module is the identity at
      initialisation (both gammas start at 0) and each branch adds its attention term once, as
      in the head.
    - ``fusion="sum"``: ``out = PAM(x) + CAM(x) = 2 x + ...``, the literal sum of the two modules
      (the head's sum without its convs); doubles the input's scale, not the identity at init.

    Submodules ``pam`` (:class:`DANetPositionAttention`) and ``cam``
    (:class:`DANetChannelAttention`); the full DANet head, with its convs and classifiers, is
    built from them in the segmentation layer.

    Args:
        channels: input channels ``C``.
        reduction: PAM's query/key reduction (8).
        energy: CAM's energy form (``"rowmax_minus"``, authors' code, or ``"plain"``).
        fusion: ``"residual"`` (default) or ``"sum"``, see above.

    Attention for visualisation: :meth:`attention_map` returns PAM's ``(B, N, N)`` map;
    ``module.cam.attention_map(x)`` returns CAM's ``(B, C, C)`` map.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 8,
        energy: str = "rowmax_minus",
        fusion: str = "residual",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "channels", channels)
        check_positive_int(name, "reduction", reduction)
        check_choice(name, "energy", energy, CAM_ENERGIES)
        check_choice(name, "fusion", fusion, FUSIONS)
        self.channels = channels
        self.fusion = fusion
        self.pam = DANetPositionAttention(channels, reduction=reduction)
        self.cam = DANetChannelAttention(channels, energy=energy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, self.channels)
        out = self.pam(x) + self.cam(x)
        return out if self.fusion == "sum" else out - x

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """PAM's position attention ``(B, N, N)`` (CAM's: ``self.cam.attention_map(x)``)."""
        check_input(type(self).__name__, x, self.channels)
        return self.pam.attention_map(x)

    #: the maps depend on ``query`` (see :mod:`attnzoo.ops.query`)
    attention_query: ClassVar[bool] = True

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """PAM's ``spatial`` map (for ``query``) and CAM's ``channel_affinity`` and ``channel``
        (see :meth:`DANetPositionAttention.attention_maps`,
        :meth:`DANetChannelAttention.attention_maps`)."""
        check_input(type(self).__name__, x, self.channels)
        return {**self.pam.attention_maps(x, query=query), **self.cam.attention_maps(x)}

    def extra_repr(self) -> str:
        return f"{self.channels}, fusion={self.fusion!r}"
