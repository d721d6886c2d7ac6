"""Global context block (GCNet).

Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
ICCV Workshops 2019. Official code: https://github.com/xvjiarui/GCNet (identical to mmcv's
``ContextBlock``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from attnzoo.ops import fused_norm, kernels
from attnzoo.ops.divisible import make_divisible
from attnzoo.ops.gates import fast_path_enabled
from attnzoo.ops.validation import (
    check_choice,
    check_input,
    check_positive_float,
    check_positive_int,
)
from attnzoo.registry import register

__all__ = ["GlobalContext", "gc_param_count"]

_NAME = "GlobalContext"
_FUSIONS = ("channel_add", "channel_mul")


def _check_fusion(fusion: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``fusion`` to a tuple in canonical order; a single string is one fusion."""
    items = (fusion,) if isinstance(fusion, str) else tuple(fusion) if _iterable(fusion) else None
    if not items or any(f not in _FUSIONS for f in items):
        raise ValueError(
            f"{_NAME}: fusion must be a non-empty subset of {_FUSIONS}; got {fusion!r}"
        )
    return tuple(f for f in _FUSIONS if f in items)


def _iterable(value: object) -> bool:
    try:
        iter(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _planes(channels: int, ratio: float, divisor: int | None) -> int:
    """Bottleneck width: ``int(C * ratio)`` (official), or rounded to ``divisor`` (timm); >= 1."""
    if divisor is None:
        return max(1, int(channels * ratio))
    return make_divisible(channels * ratio, divisor, round_limit=0.0)


def _check_args(channels: int, ratio: float, pooling: str, fusion: str | Iterable[str],
                divisor: int | None, eps: float) -> tuple[str, ...]:
    check_positive_int(_NAME, "channels", channels)
    check_positive_float(_NAME, "ratio", ratio)
    check_choice(_NAME, "pooling", pooling, ("att", "avg"))
    if divisor is not None:
        check_positive_int(_NAME, "divisor", divisor)
    check_positive_float(_NAME, "eps", eps)
    return _check_fusion(fusion)


def gc_param_count(
    channels: int,
    *,
    ratio: float = 1 / 16,
    pooling: str = "att",
    fusion: str | Iterable[str] = ("channel_add",),
    divisor: int | None = None,
    eps: float = 1e-5,
) -> int:
    """Closed-form parameter count of :class:`GlobalContext` (same keywords).

    ``C + 1`` for the attention-pooling mask (``pooling="att"``), plus per fusion branch
    ``C p + p`` (conv) ``+ 2p`` (LayerNorm) ``+ p C + C`` (conv), ``p = planes``.
    """
    fusions = _check_args(channels, ratio, pooling, fusion, divisor, eps)
    p = _planes(channels, ratio, divisor)
    mask = channels + 1 if pooling == "att" else 0
    return mask + len(fusions) * (2 * channels * p + 3 * p + channels)


def _transform(channels: int, planes: int, eps: float) -> nn.Sequential:
    """conv 1x1 C->p, LayerNorm([p, 1, 1]), ReLU, conv 1x1 p->C (official layer indices 0..3)."""
    return nn.Sequential(
        nn.Conv2d(channels, planes, 1),
        nn.LayerNorm([planes, 1, 1], eps=eps),
        nn.ReLU(inplace=True),
        nn.Conv2d(planes, channels, 1),
    )


@register(
    "gc",
    family="channel",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    venue="ICCVW",
    year=2019,
    code="https://github.com/xvjiarui/GCNet",
    presets={
        # timm.layers.GlobalContext defaults (fuse_scale only, rd_ratio 1/8, LayerNorm2d eps 1e-6).
        "timm": {"fusion": ("channel_mul",), "ratio": 1 / 8, "divisor": 1, "eps": 1e-6},
        "r4": {"ratio": 1 / 4},
    },
    param_count=gc_param_count,
    spatial_dims=2,
    example_channels=64,
    identity_at_init=True,
)
class GlobalContext(nn.Module):
    """GCNet's global context block: attention-pooled context, bottleneck transform, fusion.

    Paper: Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    ICCV Workshops 2019 (journal version TPAMI 2020).

    Equation. Context modelling (``pooling="att"``): ``w = softmax_over_HW(W_k x)`` with a 1x1
    conv ``C -> 1`` (bias), ``c = sum_j w_j x_j`` (a ``(C, HW) x (HW, 1)`` product, no ``N x N``
    matrix). ``pooling="avg"``: ``c = mean_HW(x)``. Transform per fusion branch:
    ``t = conv_2(ReLU(LayerNorm(conv_1(c))))`` with ``conv_1: C -> p``, ``p = int(C * ratio)``
    (at least 1), LayerNorm over ``[p, 1, 1]``, ``conv_2: p -> C`` (biases). Fusion:
    ``channel_mul``: ``y = x * sigmoid(t_mul)``; ``channel_add``: ``y = y + t_add`` (multiplication
    first when both are used, as in the official code).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; context ``(B, C, 1, 1)``.

    Defaults from the official code: ``ratio=1/16`` (the paper's r16; ``preset="r4"`` for 1/4),
    ``pooling="att"``, ``fusion=("channel_add",)``. Official initialisation: the mask conv is
    Kaiming-normal (fan_in, ReLU gain) with zero bias, and the LAST conv of every fusion branch
    has zero weight and bias. So the default (add) block is the identity at init; with
    ``channel_mul`` the gate starts at ``sigmoid(0) = 0.5``, i.e. ``channel_mul`` alone halves
    the input at init, exactly as in the official code.

    Submodule names follow the official code (``conv_mask``, ``channel_add_conv.{0,1,3}``,
    ``channel_mul_conv.{0,1,3}``), so official/mmcv ``ContextBlock`` state dicts load directly.

    Attention for visualisation: ``self.context_softmax`` produces the pooling weights
    ``(B, 1, H*W)`` (hook it), :meth:`attention_map` returns them as ``(B, 1, H, W)``; the
    channel_mul gate is ``self.gate`` (``nn.Sigmoid``), output ``(B, C, 1, 1)``.

    Performance: in eager training (gradients on, ``x`` requiring grad) the block runs as one
    ``autograd.Function`` whose backward fuses the feature-map passes (see
    ``_GlobalContextFunction``); ``torch.compile``, ONNX export, autocast and inference run the
    plain code.
    The pooling is a ``(C, HW) x (HW, 1)`` product on a view of ``x`` (no copy for channels_last).

    Variants by keyword: timm's ``GlobalContext`` defaults are ``fusion=("channel_mul",)``,
    ``ratio=1/8``, ``divisor=1`` (timm rounds ``C * ratio`` to the nearest integer instead of
    truncating) and ``eps=1e-6`` (its ``LayerNorm2d``); preset ``"timm"``. timm's ``"gca"``
    attention is ``fusion=("channel_add",)`` with those widths. The source documents' code is the
    official ``ContextBlock``.

    Args:
        channels: input channels ``C``.
        ratio: bottleneck ratio ``p / C``.
        pooling: ``"att"`` (attention pooling) or ``"avg"`` (global average pooling).
        fusion: non-empty subset of ``("channel_add", "channel_mul")`` (a single string is one).
        divisor: ``None`` truncates ``C * ratio`` (official); an integer rounds it to the nearest
            multiple of ``divisor`` (timm's ``make_divisible(.., round_limit=0)``).
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        channels: int,
        *,
        ratio: float = 1 / 16,
        pooling: str = "att",
        fusion: str | Iterable[str] = ("channel_add",),
        divisor: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        fusions = _check_args(channels, ratio, pooling, fusion, divisor, eps)
        self.channels = channels
        self.pooling = pooling
        self.fusion = fusions
        self.planes = planes = _planes(channels, ratio, divisor)
        if pooling == "att":
            self.conv_mask = nn.Conv2d(channels, 1, 1)
            self.context_softmax = nn.Softmax(dim=-1)
        self.channel_add_conv = (
            _transform(channels, planes, eps) if "channel_add" in fusions else None
        )
        self.channel_mul_conv = (
            _transform(channels, planes, eps) if "channel_mul" in fusions else None
        )
        self.gate = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (``kaiming_init(conv_mask, mode='fan_in')``, last zero)."""
        if self.pooling == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for branch in (self.channel_add_conv, self.channel_mul_conv):
            if branch is not None:
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)

    def _pool_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-pooling weights ``(B, 1, H*W)``."""
        return self.context_softmax(self.conv_mask(x).flatten(2))

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Global context ``(B, C, 1, 1)``."""
        if self.pooling == "att":
            weights = self._pool_weights(x)
            # (B, C, HW) @ (B, HW, 1): a view of x for both memory formats, no N x N matrix.
            return torch.matmul(x.flatten(2), weights.transpose(1, 2)).unsqueeze(-1)
        return x.mean((2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.channels)
        if fast_path_enabled(x) and not torch.is_autocast_enabled(x.device.type):
            return _GlobalContextFunction.apply(x, self, *self.parameters())
        ctx = self.context(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * self.gate(self.channel_mul_conv(ctx))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(ctx)
        return out

    def forward_after_batchnorm(self, norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """``self(norm(z))``. With attention pooling and add fusion (the default), when
        :func:`attnzoo.ops.fused_norm.fusable`, BatchNorm and the block run as one fused op
        (:class:`_NormGlobalContextFunction`: the normalised map is never written; forward two
        passes over ``z`` plus BatchNorm's, backward four); attached blocks call this."""
        if (self.pooling == "att" and self.channel_mul_conv is None
                and fused_norm.fusable(norm, self, z)):
            check_input(_NAME, z, self.channels)
            return _NormGlobalContextFunction.apply(z, norm, self, norm.weight, norm.bias,
                                                    *self.parameters())
        return self(norm(z))

    def transforms(self, ctx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mul gate ``sigmoid(t_mul)`` and the add term ``t_add`` (``None`` when unused)."""
        scale = self.gate(self.channel_mul_conv(ctx)) if self.channel_mul_conv is not None else None
        shift = self.channel_add_conv(ctx) if self.channel_add_conv is not None else None
        return scale, shift

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Context pooling weights ``(B, 1, H, W)`` (uniform ``1/HW`` for ``pooling="avg"``)."""
        check_input(_NAME, x, self.channels)
        b, _, h, w = x.shape
        if self.pooling == "att":
            return self._pool_weights(x).view(b, 1, h, w)
        return x.new_full((b, 1, h, w), 1.0 / (h * w))


class _GlobalContextFunction(torch.autograd.Function):
    """Eager training path of :class:`GlobalContext` with a lean backward.

    Same forward as the plain code. The backward makes few passes over the feature map:
    ``sum_HW(g * x)`` and/or ``sum_HW(g)`` for the fusion terms, autograd on the tiny transform
    graph (context leaf -> gate/shift), two ``(C, HW)`` products for the attention-pooling weights
    and the mask conv, then ONE fused pass ``grad_x = g * s + [grad_c, w_mask] @ [w; grad_logits]``
    (a ``baddbmm`` of rank 2) instead of autograd's separate broadcasts and additions. Used only
    when :func:`attnzoo.ops.gates.fast_path_enabled` (eager, gradients on, ``x`` requires grad)
    and autocast is off; ``torch.compile``, ONNX export and autocast run the plain code.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mod: GlobalContext, *params: torch.Tensor) -> torch.Tensor:
        weights = mod._pool_weights(x) if mod.pooling == "att" else None
        if weights is not None:
            context = torch.matmul(x.flatten(2), weights.transpose(1, 2)).unsqueeze(-1)
        else:
            context = x.mean((2, 3), keepdim=True)
        leaf = context.detach().requires_grad_()
        with torch.enable_grad():
            scale, shift = mod.transforms(leaf)
        out = x if scale is None else x * scale.detach()
        if shift is not None:
            out = out + shift.detach()
        ctx.save_for_backward(x, weights)
        ctx.mod, ctx.leaf, ctx.scale, ctx.shift, ctx.params = mod, leaf, scale, shift, params
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weights = ctx.saved_tensors
        mod, leaf, scale, shift, params = ctx.mod, ctx.leaf, ctx.scale, ctx.shift, ctx.params
        b, c, h, w = x.shape
        outputs, grad_outputs = [], []
        if scale is not None:
            outputs.append(scale)
            grad_outputs.append((g * x).sum((2, 3), keepdim=True))
        if shift is not None:
            outputs.append(shift)
            grad_outputs.append(g.sum((2, 3), keepdim=True))
        mask_params = set()
        if weights is not None:
            mask_params = {id(mod.conv_mask.weight), id(mod.conv_mask.bias)}
        wanted = [i for i, p in enumerate(params)
                  if ctx.needs_input_grad[2 + i] and id(p) not in mask_params]
        # retain_graph: the outer graph may be differentiated again (gradcheck, retain_graph=True);
        # the tiny transform graph is freed together with ctx.
        grads = torch.autograd.grad(outputs, [leaf] + [params[i] for i in wanted], grad_outputs,
                                    allow_unused=True, retain_graph=True)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for i, gp in zip(wanted, grads[1:]):
            param_grads[i] = gp
        grad_ctx = grads[0].view(b, c, 1)
        direct = g if scale is None else g * scale.detach()
        if weights is None:  # average pooling: d context / dx = 1 / HW
            return (direct + grad_ctx.unsqueeze(-1) / (h * w), None, *param_grads)
        x_flat = x.flatten(2)
        grad_w = torch.matmul(grad_ctx.transpose(1, 2), x_flat)  # (B, 1, HW)
        grad_logits = weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))
        w_mask = mod.conv_mask.weight.view(1, c, 1).expand(b, c, 1)
        left = torch.cat([grad_ctx, w_mask], 2)  # (B, C, 2)
        right = torch.cat([weights, grad_logits], 1)  # (B, 2, HW)
        if direct.is_contiguous():
            grad_x = torch.baddbmm(direct.view(b, c, h * w), left, right).view(b, c, h, w)
        elif direct.is_contiguous(memory_format=torch.channels_last):
            nhwc = direct.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view
            grad_x = torch.baddbmm(nhwc, right.transpose(1, 2), left.transpose(1, 2))
            grad_x = grad_x.view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            grad_x = direct + torch.bmm(left, right).view(b, c, h, w)
        for i, p in enumerate(params):
            if not ctx.needs_input_grad[2 + i]:
                continue
            if p is mod.conv_mask.weight:
                param_grads[i] = torch.matmul(x_flat, grad_logits.transpose(1, 2)).sum(0).view_as(p)
            elif p is mod.conv_mask.bias:
                param_grads[i] = grad_logits.sum().view_as(p)
        return (grad_x, None, *param_grads)


class _NormGlobalContextFunction(torch.autograd.Function):
    """``gc(bn(z))`` for a plain BatchNorm2d ``bn`` and a GC block with attention pooling and add
    fusion, without materialising ``u = bn(z)``.

    Per channel ``u = a * z + d`` (``a = gamma / sigma``, ``d = beta - a * mu``), so:
    logits ``l[b, p] = sum_c (w_c a_c) z[b, c, p] + sum_c w_c d_c + bias`` (a weighted channel
    sum of ``z``), pooling weights ``alpha = softmax_p(l)``, context
    ``ctx = a * sum_p z alpha + d * sum_p alpha``, output ``y = a * z + (d + t(ctx))``: BatchNorm's
    statistics pass, two passes for the logits and the context, one output pass.

    Backward with ``g = dL/dy``: ``G1 = sum_p g``, ``G2 = sum_p g z`` (one pass); ``dL/dt = G1``
    through the tiny transform graph gives ``k = dL/dctx``; ``dL/dalpha = sum_c (k a) z + sum_c k d``
    (one pass) and ``lam = alpha * (dL/dalpha - <alpha, dL/dalpha>)`` (softmax backward);
    ``sum_p z lam`` (one pass) gives the mask conv's gradient; with
    ``du = g + k alpha + w lam`` (the gradient w.r.t. ``u``), BatchNorm's backward needs only the
    per-row sums ``sum_p du`` and ``sum_p du (z - mu)``, which follow from the sums above, and
    ``dL/dz = a g + R z + Q + (a k) alpha + (a w) lam`` is one final pass.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, norm: nn.BatchNorm2d, mod: GlobalContext,
                gamma: torch.Tensor | None, beta: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        _, mu, var, batch = fused_norm.batch_statistics(norm, z)
        sigma = (var + norm.eps).sqrt()
        a = (gamma.view(1, c, 1, 1) if gamma is not None else 1.0) / sigma
        d = (beta.view(1, c, 1, 1) if beta is not None else 0.0) - a * mu
        w_mask = mod.conv_mask.weight.view(1, c, 1, 1)
        coef = (w_mask * a).expand(b, c, 1, 1).contiguous()
        offset = (w_mask * d).sum() + mod.conv_mask.bias
        logits = kernels.channel_weighted_sum(z, coef) + offset
        alpha = mod.context_softmax(logits.view(b, 1, h * w)).view(b, h * w).contiguous()
        alpha_sum = alpha.sum(1).view(b, 1, 1, 1)
        z_alpha = kernels.rows_dot_pixels(z, alpha)
        context = a * z_alpha + d * alpha_sum
        leaf = context.detach().requires_grad_()
        with torch.enable_grad():
            _, shift = mod.transforms(leaf)
        y = kernels.rows_scale_shift(z, a.expand(b, c, 1, 1).contiguous(),
                                     (d + shift.detach()).contiguous())
        ctx.save_for_backward(z, alpha)
        ctx.mod, ctx.params, ctx.leaf, ctx.shift, ctx.batch = mod, params, leaf, shift, batch
        ctx.a, ctx.d, ctx.mu, ctx.sigma = a, d, mu, sigma
        ctx.alpha_sum, ctx.z_alpha = alpha_sum, z_alpha
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        z, alpha = ctx.saved_tensors
        mod, params, a, d, mu, sigma = ctx.mod, ctx.params, ctx.a, ctx.d, ctx.mu, ctx.sigma
        b, c, h, w = z.shape
        g = g.contiguous()
        g_sum, g_dot = kernels.rows_sum_dot(g, z)
        mask = (mod.conv_mask.weight, mod.conv_mask.bias)
        wanted = [i for i, p in enumerate(params)
                  if ctx.needs_input_grad[5 + i] and not any(p is m for m in mask)]
        grads = torch.autograd.grad([ctx.shift], [ctx.leaf] + [params[i] for i in wanted],
                                    [g_sum], allow_unused=True, retain_graph=True)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for i, grad in zip(wanted, grads[1:]):
            param_grads[i] = grad
        k = grads[0] if grads[0] is not None else torch.zeros_like(ctx.leaf)
        grad_alpha = kernels.channel_weighted_sum(z, (k * a).contiguous()) + (k * d).sum(
            (1, 2, 3)).view(b, 1)
        lam = (alpha * (grad_alpha - (grad_alpha * alpha).sum(1, keepdim=True))).contiguous()
        lam_sum = lam.sum(1).view(b, 1, 1, 1)
        z_lam = kernels.rows_dot_pixels(z, lam)
        for i, p in enumerate(params):
            if ctx.needs_input_grad[5 + i] and p is mask[0]:
                param_grads[i] = (a * z_lam + d * lam_sum).sum(0).view_as(p)
            elif ctx.needs_input_grad[5 + i] and p is mask[1]:
                param_grads[i] = lam_sum.sum().view_as(p)
        w_mask = mask[0].view(1, c, 1, 1)
        du_sum = g_sum + k * ctx.alpha_sum + w_mask * lam_sum
        du_dev = (g_dot - mu * g_sum) + k * (ctx.z_alpha - mu * ctx.alpha_sum) \
            + w_mask * (z_lam - mu * lam_sum)
        S = du_sum.sum(0, keepdim=True)
        T = du_dev.sum(0, keepdim=True)
        grad_gamma = (T / sigma).view(-1) if ctx.needs_input_grad[3] else None
        grad_beta = S.view(-1) if ctx.needs_input_grad[4] else None
        grad_z = None
        if ctx.needs_input_grad[0]:
            total = b * h * w
            if ctx.batch:
                R = -a * T / (total * sigma.square())
                Q = -a * S / total - R * mu
            else:
                R = Q = torch.zeros_like(a)
            rows = (b, c, 1, 1)
            grad_z = kernels.rows_affine2_pixels(
                g, z, a.expand(rows).contiguous(), R.expand(rows).contiguous(),
                Q.expand(rows).contiguous(), (a * k).expand(rows).contiguous(),
                (a * w_mask).expand(rows).contiguous(), alpha, lam)
        return (grad_z, None, None, grad_gamma, grad_beta, *param_grads)
