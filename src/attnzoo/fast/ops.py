"""The fast paths as ``torch.library`` custom ops: ``attnzoo::cbam``, ``attnzoo::eca``,
``attnzoo::gc_context``, ``attnzoo::gc_add`` and ``attnzoo::bn_gate``.

Each module is one op forward and one op backward, so ``torch.compile``, ``torch.export``,
``torch.fx`` and ``FlopCounterMode`` see a single node (with a FLOP formula) instead of the loops
behind it. The ops are correct for every input: on float32, contiguous CPU tensors they run the
fused loops of :mod:`attnzoo.fast.kernels`; on anything else (or without a C compiler) they compute
the plain formula with torch ops.

CBAM (channel gate ``s``, then spatial gate ``a``; ``v = x * s`` is never written)::

    forward:  mean_c, max_c = pools over H, W of x                       (one pass)
              s = sigmoid(mlp(mean_c) + mlp(max_c))
              mean_s, M = mean and max over C of x * s                     (one pass)
              a = sigmoid(bn(conv([M, mean_s])))      ([mean_s, M] for pool_order "mean-max")
              y = x * s * a                                                (one pass)
    backward: grad_a = sum_c s g x (+ tie counts of M)                     (one pass)
              gate networks backward on (B, C) and (B, 2, H, W) tensors
              dL/dv = g a + gm / C + [v == M] gM / cnt
              grad_s = sum_p x dL/dv (+ tie counts of max_c)                 (one pass)
              grad_x = dL/dv s + gmean / HW + [x == max_c] gmax / rowcnt   (one pass)

ECA: ``y = x * s``, ``s = sigmoid(conv1d(mean_hw(x)))``; backward ``grad_s = sum_hw g x`` (one
pass, no product written) and ``grad_x = g s + gz / HW`` (one pass).

GC: with add fusion alone (the official default) the whole block, ``y = x + T(c(x))``, is one op
whose backward writes ``grad_x = g + dc p^T + wk dl^T`` once (autograd's graph writes the
context's rank-2 gradient, then adds ``g`` to it); with other fusions the attention pooling
alone (section comments below).

Ties of the max pools split the gradient evenly, exactly as ``amax``'s backward.

Double backward: the registered backward is twice differentiable. When a graph of the backward
is requested (``create_graph=True``: grad mode is on inside the backward), it recomputes the
plain formula and differentiates that with autograd instead of calling the fused backward op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from attnzoo.fast import kernels

__all__ = [
    "bn_gate",
    "bn_gate_plain",
    "cbam",
    "cbam_plain",
    "eca",
    "eca_plain",
    "gc_context",
    "gc_context_plain",
]

_aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# the plain formulas (the fallback, and what double backward differentiates)
def _mlp(z: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    return F.linear(F.relu(F.linear(z, w1, b1)), w2, b2)


def _spatial_logits(
    maps: Tensor,
    conv_w: Tensor,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
) -> Tensor:
    z = F.conv2d(maps, conv_w, padding=conv_w.shape[-1] // 2)
    if bn_w is None:
        return z
    return F.batch_norm(
        z,
        None if use_batch_stats else running_mean,
        None if use_batch_stats else running_var,
        bn_w,
        bn_b,
        use_batch_stats,
        0.0,
        eps,
    )


def cbam_plain(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    conv_w: Tensor,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
    max_first: bool,
) -> Tensor:
    """Channel-then-spatial CBAM with torch ops (running statistics are read, never updated)."""
    logits = _mlp(x.mean((2, 3)), w1, b1, w2, b2) + _mlp(x.amax((2, 3)), w1, b1, w2, b2)
    v = x * torch.sigmoid(logits)[:, :, None, None]
    mx, avg = v.amax(1, keepdim=True), v.mean(1, keepdim=True)
    maps = torch.cat([mx, avg] if max_first else [avg, mx], 1)
    z = _spatial_logits(maps, conv_w, bn_w, bn_b, running_mean, running_var, use_batch_stats, eps)
    return v * torch.sigmoid(z)


def eca_plain(x: Tensor, weight: Tensor) -> Tensor:
    """``x * sigmoid(conv1d(mean_hw(x)))`` with torch ops."""
    z = x.mean((2, 3))[:, None, :]
    logits = F.conv1d(z, weight, padding=weight.shape[-1] // 2)
    return x * torch.sigmoid(logits)[:, 0, :, None, None]


def _plain_grads(
    fn, inputs: list[Tensor | None], g: Tensor, create_graph: bool
) -> list[Tensor | None]:
    """Gradients of ``fn(*inputs)`` w.r.t. the inputs that require them (others: None)."""
    wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    with torch.enable_grad():
        if not create_graph:
            inputs = [
                t.detach().requires_grad_(t.requires_grad)
                if isinstance(t, Tensor) and t.is_floating_point()
                else t
                for t in inputs
            ]
            wanted = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
        out = fn(*inputs)
        grads = (
            torch.autograd.grad(out, wanted, g, create_graph=create_graph, allow_unused=True)
            if wanted
            else ()
        )
    by_id = {id(t): gr for t, gr in zip(wanted, grads)}
    return [by_id.get(id(t)) if isinstance(t, Tensor) else None for t in inputs]


# ---------------------------------------------------------------------------------------------
# CBAM
@torch.library.custom_op("attnzoo::cbam", mutates_args=())
def cbam(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    conv_w: Tensor,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
    max_first: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Channel-then-spatial CBAM (module docstring). Returns ``y`` and what the backward needs:
    ``s``, ``a``, ``M``, ``mean_c``, ``max_c``, ``maps``, ``z`` (the conv output, from which the
    caller updates BatchNorm's running statistics: the op is functional), BatchNorm's saved mean
    and inverse std. The running statistics are read only without ``use_batch_stats``."""
    b, c, h, w = x.shape
    fused = kernels.usable(x)
    if fused:
        mean_c, max_c = kernels.rows_mean_max(x)
    else:
        mean_c, max_c = x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    logits = _mlp(mean_c.view(b, c), w1, b1, w2, b2) + _mlp(max_c.view(b, c), w1, b1, w2, b2)
    s = torch.sigmoid(logits).view(b, c, 1, 1).contiguous()
    if fused and kernels.usable(s):
        mean_s, big_m = kernels.channel_mean_max_scaled(x, s)
    else:
        v = x * s
        mean_s, big_m = v.mean(1, keepdim=True), v.amax(1, keepdim=True)
    maps = torch.cat([big_m, mean_s] if max_first else [mean_s, big_m], 1)
    k = conv_w.shape[-1]
    if fused and w + k - 1 <= kernels.MAX_CONV_ROW and kernels.usable(conv_w):
        z = kernels.conv_same(maps, conv_w.contiguous())
    else:
        z = F.conv2d(maps, conv_w, padding=k // 2)
    if bn_w is None:
        zn, save_mean, save_invstd = z, z.new_empty(0), z.new_empty(0)
    else:
        stats = (None, None) if use_batch_stats else (running_mean, running_var)
        zn, save_mean, save_invstd = _aten.native_batch_norm(
            z, bn_w, bn_b, *stats, use_batch_stats, 0.0, eps
        )
    a = torch.sigmoid(zn)
    y = kernels.scale_channel_spatial(x, s, a) if fused and kernels.usable(a) else x * s * a
    return y, s, a, big_m, mean_c, max_c, maps, z, save_mean, save_invstd


@cbam.register_fake
def _(
    x,
    w1,
    b1,
    w2,
    b2,
    conv_w,
    bn_w,
    bn_b,
    running_mean,
    running_var,
    use_batch_stats,
    eps,
    max_first,
):
    b, c, h, w = x.shape
    pixel = x.new_empty(b, 1, h, w)
    row = x.new_empty(b, c, 1, 1)
    stats = x.new_empty(0 if bn_w is None else 1)
    return (
        torch.empty_like(x),
        row,
        pixel,
        torch.empty_like(pixel),
        torch.empty_like(row),
        torch.empty_like(row),
        x.new_empty(b, 2, h, w),
        torch.empty_like(pixel),
        stats,
        torch.empty_like(stats),
    )


def _depthwise(x: Tensor, kernels_: Tensor, padding: int) -> Tensor:
    """Depthwise correlation of ``x`` ``(B, C, H, W)`` with one kernel per (sample, channel),
    ``kernels_`` ``(B * C, 1, kh, kw)``."""
    b, c, h, w = x.shape
    out = F.conv2d(x.reshape(1, b * c, h, w), kernels_, padding=padding, groups=b * c)
    return out.view(b, c, out.shape[-2], out.shape[-1])


def _conv_same_backward(
    dz: Tensor, maps: Tensor, conv_w: Tensor, depthwise: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of ``F.conv2d(maps, conv_w, padding=k // 2)`` (``Cin -> 1``, no bias) w.r.t.
    ``maps`` and ``conv_w``. ``depthwise``: as ``B * Cin`` depthwise convolutions (oneDNN's
    depthwise kernels are several times faster than its dense backward for ``Cin = 2, Cout = 1``
    on large maps); else ``aten.convolution_backward``."""
    k = conv_w.shape[-1]
    if not depthwise:
        d_maps, g_conv, _ = _aten.convolution_backward(
            dz,
            maps,
            conv_w,
            None,
            [1, 1],
            [k // 2, k // 2],
            [1, 1],
            False,
            [0, 0],
            1,
            [True, True, False],
        )
        return d_maps, g_conv
    b, c, h, w = maps.shape
    dz_rep = dz.expand(b, c, h, w)
    flipped = conv_w.flip(-1, -2).reshape(c, 1, k, k).repeat(b, 1, 1, 1)
    d_maps = _depthwise(dz_rep, flipped, k // 2)
    padded = F.pad(maps, (k // 2,) * 4)
    g_conv = _depthwise(padded, dz_rep.reshape(b * c, 1, h, w), 0).sum(0).view_as(conv_w)
    return d_maps, g_conv


@torch.library.custom_op("attnzoo::cbam_backward", mutates_args=())
def cbam_backward(
    g: Tensor,
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    conv_w: Tensor,
    bn_w: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    s: Tensor,
    a: Tensor,
    big_m: Tensor,
    mean_c: Tensor,
    max_c: Tensor,
    maps: Tensor,
    z: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    use_batch_stats: bool,
    eps: float,
    max_first: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`cbam`'s ``y`` w.r.t. ``x, w1, b1, w2, b2, conv_w, bn_w, bn_b``
    (zeros for absent biases / BatchNorm)."""
    b, c, h, w = x.shape
    g = g.contiguous()
    fused = kernels.usable(g, x, s, a, big_m, max_c)
    if fused:
        grad_a, cnt = kernels.cbam_grad_spatial(g, x, s, big_m)
    else:
        v = x * s
        grad_a = (g * v).sum(1, keepdim=True)
        cnt = (v == big_m).sum(1, keepdim=True).to(x.dtype)
    dzn = grad_a * a * (1 - a)
    if bn_w is None:
        dz, g_bn_w, g_bn_b = dzn, conv_w.new_zeros(1), conv_w.new_zeros(1)
    else:
        dz, g_bn_w, g_bn_b = _aten.native_batch_norm_backward(
            dzn,
            z,
            bn_w,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            use_batch_stats,
            eps,
            [True, True, True],
        )
    d_maps, g_conv = _conv_same_backward(dz, maps, conv_w, depthwise=fused)
    d_max, d_mean = (d_maps[:, :1], d_maps[:, 1:]) if max_first else (d_maps[:, 1:], d_maps[:, :1])
    gm_c = (d_mean / c).contiguous()
    share = (d_max / cnt).contiguous()  # used only where v == M, where cnt >= 1
    if fused:
        grad_s, rowcnt = kernels.cbam_grad_channel(g, x, s, a, gm_c, big_m, share, max_c)
    else:
        v = x * s
        dv = g * a + gm_c + (v == big_m).to(x.dtype) * share
        grad_s = (x * dv).sum((2, 3), keepdim=True)
        rowcnt = (x == max_c).sum((2, 3), keepdim=True).to(x.dtype)
    # the shared MLP on both descriptors: logits = mlp(mean_c) + mlp(max_c)
    s2 = s.view(b, c)
    d_logits = grad_s.view(b, c) * s2 * (1 - s2)
    ins = (mean_c.view(b, c), max_c.view(b, c))
    pre = [F.linear(t, w1, b1) for t in ins]
    hidden = [p.clamp_min(0) for p in pre]
    g_w2 = d_logits.t() @ (hidden[0] + hidden[1])
    g_b2 = 2 * d_logits.sum(0)
    d_hidden = d_logits @ w2
    d_pre = [d_hidden * (p > 0).to(p.dtype) for p in pre]
    g_w1 = d_pre[0].t() @ ins[0] + d_pre[1].t() @ ins[1]
    g_b1 = (d_pre[0] + d_pre[1]).sum(0)
    g_mean, g_max = (d @ w1 for d in d_pre)
    g_mean_p = (g_mean / (h * w)).view(b, c, 1, 1).contiguous()
    g_max_share = (g_max.view(b, c, 1, 1) / rowcnt).contiguous()
    if fused:
        grad_x = kernels.cbam_grad_input(
            g, x, s, a, gm_c, big_m, share, max_c, g_mean_p, g_max_share
        )
    else:
        grad_x = dv * s + g_mean_p + (x == max_c).to(x.dtype) * g_max_share
    return grad_x, g_w1, g_b1, g_w2, g_b2, g_conv, g_bn_w, g_bn_b


@cbam_backward.register_fake
def _(
    g,
    x,
    w1,
    b1,
    w2,
    conv_w,
    bn_w,
    running_mean,
    running_var,
    s,
    a,
    big_m,
    mean_c,
    max_c,
    maps,
    z,
    save_mean,
    save_invstd,
    use_batch_stats,
    eps,
    max_first,
):
    return (
        torch.empty_like(x),
        torch.empty_like(w1),
        w1.new_empty(w1.shape[0]),
        torch.empty_like(w2),
        w2.new_empty(w2.shape[0]),
        torch.empty_like(conv_w),
        conv_w.new_empty(1),
        conv_w.new_empty(1),
    )


_CBAM_GRAD_INPUTS = 8  # x, w1, b1, w2, b2, conv_w, bn_w, bn_b


def _cbam_setup(ctx, inputs, output) -> None:
    (
        x,
        w1,
        b1,
        w2,
        b2,
        conv_w,
        bn_w,
        bn_b,
        running_mean,
        running_var,
        use_batch_stats,
        eps,
        max_first,
    ) = inputs
    keep_stats = bn_w is not None and not use_batch_stats
    ctx.save_for_backward(
        x,
        w1,
        b1,
        w2,
        b2,
        conv_w,
        bn_w,
        bn_b,
        running_mean if keep_stats else None,
        running_var if keep_stats else None,
        *output[1:],
    )
    ctx.flags = (use_batch_stats, eps, max_first)


def _cbam_backward(ctx, g: Tensor, *unused: Tensor):
    (
        x,
        w1,
        b1,
        w2,
        b2,
        conv_w,
        bn_w,
        bn_b,
        running_mean,
        running_var,
        s,
        a,
        big_m,
        mean_c,
        max_c,
        maps,
        z,
        save_mean,
        save_invstd,
    ) = ctx.saved_tensors
    use_batch_stats, eps, max_first = ctx.flags
    params = [x, w1, b1, w2, b2, conv_w, bn_w, bn_b]
    if torch.is_grad_enabled():  # create_graph: differentiate the plain formula
        grads = _plain_grads(
            lambda *t: cbam_plain(*t, running_mean, running_var, use_batch_stats, eps, max_first),
            params,
            g,
            create_graph=True,
        )
    else:
        grads = list(
            cbam_backward(
                g,
                x,
                w1,
                b1,
                w2,
                conv_w,
                bn_w,
                running_mean,
                running_var,
                s,
                a,
                big_m,
                mean_c,
                max_c,
                maps,
                z,
                save_mean,
                save_invstd,
                use_batch_stats,
                eps,
                max_first,
            )
        )
        grads = [gr if t is not None else None for gr, t in zip(grads, params)]
    return (*grads, None, None, None, None, None)


cbam.register_autograd(_cbam_backward, setup_context=_cbam_setup)


# ---------------------------------------------------------------------------------------------
# ECA's convolution across channels on (B, C) descriptors, as k shifted products: oneDNN's
# conv1d and its backward have a fixed cost of about a millisecond, which dominates at this size.
def _channel_conv(p: Tensor, weight: Tensor) -> Tensor:
    """``out[b, c] = sum_j w_j p[b, c + j - k // 2]`` (zero padding): ``F.conv1d(p[:, None],
    weight, padding=k // 2)[:, 0]`` for ``p`` ``(B, C)``, ``weight`` ``(1, 1, k)``."""
    k = weight.shape[-1]
    windows = F.pad(p, (k // 2, k // 2)).unfold(1, k, 1)  # (B, C, k), a view
    return (windows * weight.view(k)).sum(-1)


def _channel_conv_backward(d: Tensor, p: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_channel_conv` w.r.t. ``p`` ``(B, C)`` and ``weight`` for the output
    gradient ``d`` ``(B, C)``: the same products with the kernel flipped, and the windows'
    correlation with ``d``."""
    k = weight.shape[-1]
    windows = F.pad(p, (k // 2, k // 2)).unfold(1, k, 1)
    d_weight = (windows * d[:, :, None]).sum((0, 1)).view_as(weight)
    d_p = (F.pad(d, (k // 2, k // 2)).unfold(1, k, 1) * weight.view(k).flip(0)).sum(-1)
    return d_p, d_weight


# ---------------------------------------------------------------------------------------------
# ECA
@torch.library.custom_op("attnzoo::eca", mutates_args=())
def eca(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ECA (module docstring): returns ``y``, the gate ``s`` ``(B, C, 1, 1)`` and the pooled
    descriptor ``(B, 1, C)``."""
    b, c = x.shape[:2]
    z = x.mean((2, 3)).view(b, 1, c)
    s = torch.sigmoid(_channel_conv(z.view(b, c), weight)).view(b, c, 1, 1)
    return x * s, s, z


@eca.register_fake
def _(x, weight):
    b, c = x.shape[:2]
    return torch.empty_like(x), x.new_empty(b, c, 1, 1), x.new_empty(b, 1, c)


@torch.library.custom_op("attnzoo::eca_backward", mutates_args=())
def eca_backward(
    g: Tensor, x: Tensor, weight: Tensor, s: Tensor, z: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`eca`'s ``y`` w.r.t. ``x`` and ``weight``."""
    b, c, h, w = x.shape
    g = g.contiguous()
    fused = kernels.usable(g, x, s)
    grad_s = kernels.rows_dot(g, x) if fused else (g * x).sum((2, 3), keepdim=True)
    d_logits = (grad_s * s * (1 - s)).view(b, c)
    d_z, g_w = _channel_conv_backward(d_logits, z.view(b, c), weight)
    term = (d_z / (h * w)).view(b, c, 1, 1).contiguous()
    if fused and kernels.usable(term):
        grad_x = kernels.rows_scale_shift(g, s, term)
    else:
        grad_x = torch.addcmul(term, g, s)
    return grad_x, g_w


@eca_backward.register_fake
def _(g, x, weight, s, z):
    return torch.empty_like(x), torch.empty_like(weight)


def _eca_setup(ctx, inputs, output) -> None:
    x, weight = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])


def _eca_backward(ctx, g: Tensor, *unused: Tensor):
    x, weight, s, z = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiate the plain formula
        return tuple(_plain_grads(eca_plain, [x, weight], g, create_graph=True))
    grad_x, g_w = eca_backward(g, x, weight, s, z)
    return (grad_x if ctx.needs_input_grad[0] else None, g_w if ctx.needs_input_grad[1] else None)


eca.register_autograd(_eca_backward, setup_context=_eca_setup)


# ---------------------------------------------------------------------------------------------
# GC's attention pooling
#
# context c = sum_p softmax_p(l) x_p with logits l_p = wk . x_p + bk, per sample (B, C, P = H W).
# Forward: l and c are two matrix-vector products over x. Backward, for dc = dL/dc:
#   dp = dc . x_p (one product over x), dl = p * (dp - sum_p p dp) (on (B, P)),
#   dwk = sum_{b,p} dl x_p (one product over x), dbk = sum dl,
#   dx = dc p^T + wk dl^T: a rank-2 update written in ONE batched matmul, where autograd's plain
#   graph writes two full-size products and adds them (each of the pooling's and the 1x1
#   convolution's backward materialises one).
def gc_context_plain(x: Tensor, wk: Tensor, bk: Tensor) -> Tensor:
    """``sum_p softmax_p(wk . x_p + bk) x_p`` ``(B, C, 1, 1)`` with torch ops (``wk`` ``(C,)``,
    ``bk`` ``(1,)``)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    p = torch.softmax(torch.bmm(wk.view(1, 1, c).expand(b, 1, c), flat) + bk, dim=-1)
    return torch.bmm(flat, p.transpose(1, 2)).view(b, c, 1, 1)


@torch.library.custom_op("attnzoo::gc_context", mutates_args=())
def gc_context(x: Tensor, wk: Tensor, bk: Tensor) -> tuple[Tensor, Tensor]:
    """GC's attention pooling (section comment above): the context ``(B, C, 1, 1)`` and the
    softmax weights ``(B, 1, H W)``."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    p = torch.softmax(torch.bmm(wk.view(1, 1, c).expand(b, 1, c), flat) + bk, dim=-1)
    return torch.bmm(flat, p.transpose(1, 2)).view(b, c, 1, 1), p


@gc_context.register_fake
def _(x, wk, bk):
    b, c, h, w = x.shape
    return x.new_empty(b, c, 1, 1), x.new_empty(b, 1, h * w)


def _pooling_backward(
    dc: Tensor, flat: Tensor, wk: Tensor, p: Tensor, g: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The pooling's backward for the context gradient ``dc`` ``(B, C, 1)``: ``grad_x``
    ``(B, C, P)`` = ``g`` (if given) ``+ dc p^T + wk dl^T``, written once, ``dwk``, and the logit
    gradient ``dl`` ``(B, 1, P)``."""
    dp = torch.bmm(dc.transpose(1, 2), flat)  # (B, 1, P)
    dl = p * (dp - (dp * p).sum(-1, keepdim=True))
    d_wk = torch.bmm(dl, flat.transpose(1, 2)).sum(0).view(-1)
    grad_x = dc * p if g is None else torch.addcmul(g, dc, p)
    grad_x.addcmul_(wk.view(1, -1, 1), dl)
    return grad_x, d_wk, dl


@torch.library.custom_op("attnzoo::gc_context_backward", mutates_args=())
def gc_context_backward(
    g: Tensor, x: Tensor, wk: Tensor, p: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gc_context`'s context w.r.t. ``x``, ``wk`` and ``bk``."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    grad_x, d_wk, dl = _pooling_backward(g.reshape(b, c, 1), flat, wk, p)
    return grad_x.view(b, c, h, w), d_wk, dl.sum().view(1)


@gc_context_backward.register_fake
def _(g, x, wk, p):
    return torch.empty_like(x), torch.empty_like(wk), wk.new_empty(1)


def _gc_context_setup(ctx, inputs, output) -> None:
    x, wk, bk = inputs
    ctx.save_for_backward(x, wk, bk, output[1])


def _gc_context_backward(ctx, g: Tensor, *unused: Tensor):
    x, wk, bk, p = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiate the plain formula
        return tuple(_plain_grads(gc_context_plain, [x, wk, bk], g, create_graph=True))
    grads = gc_context_backward(g, x, wk, p)
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad))


gc_context.register_autograd(_gc_context_backward, setup_context=_gc_context_setup)


# ---------------------------------------------------------------------------------------------
# GC with add fusion, whole: y = x + T(c), c the attention-pooled context (above), T = conv_2 .
# relu . layer_norm . conv_1 on the (B, C) context (1x1 convolutions of a 1x1 map: matrix
# products). Backward, with g = dL/dy: dT = sum_hw g, T's backward on (B, C) gives dc, then the
# context's backward (above); grad_x = g + dc p^T + wk dl^T is written once, where autograd's
# graph writes the rank-2 term and then adds it to g.
def _gc_transform(c: Tensor, *transform: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``T(c)`` on ``(B, C)`` and what its backward needs: the normalised hidden ``n``, its
    inverse deviation ``1 / sigma`` ``(B, 1)`` and the post-ReLU hidden ``r``; ``transform`` as
    :func:`gc_transform_plain` takes it."""
    w1, b1, ln_w, ln_b, eps, w2, b2 = transform
    h = F.linear(c, w1, b1)
    var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)
    inv_sigma = (var + eps).rsqrt()
    n = (h - mean) * inv_sigma
    r = torch.relu(n * ln_w + ln_b)
    return F.linear(r, w2, b2), n, inv_sigma, r


def gc_transform_plain(
    c: Tensor,
    w1: Tensor,
    b1: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    eps: float,
    w2: Tensor,
    b2: Tensor,
) -> Tensor:
    """GC's transform ``conv_2(relu(layer_norm(conv_1(c))))`` on a ``(B, C)`` context, the 1x1
    convolutions as matrix products (``w1`` ``(P, C)``, ``w2`` ``(C, P)``), with torch ops."""
    h = F.layer_norm(F.linear(c, w1, b1), ln_w.shape, ln_w, ln_b, eps)
    return F.linear(torch.relu(h), w2, b2)


def gc_add_plain(x: Tensor, wk: Tensor, bk: Tensor, *transform: Any) -> Tensor:
    """``x + T(c(x))`` with torch ops; ``transform`` = ``(w1, b1, ln_w, ln_b, eps, w2, b2)`` as
    :func:`gc_transform_plain` takes them."""
    b, ch = x.shape[:2]
    c = gc_context_plain(x, wk, bk).view(b, ch)
    return x + gc_transform_plain(c, *transform).view(b, ch, 1, 1)


@torch.library.custom_op("attnzoo::gc_add", mutates_args=())
def gc_add(
    x: Tensor,
    wk: Tensor,
    bk: Tensor,
    w1: Tensor,
    b1: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    eps: float,
    w2: Tensor,
    b2: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GC with add fusion (section comment above). Returns ``y`` and what the backward needs:
    the softmax weights ``(B, 1, HW)``, the context ``(B, C)``, and the transform's ``n``,
    ``1 / sigma`` and ``r``."""
    b, ch = x.shape[:2]
    context, p = gc_context(x, wk, bk)
    c = context.view(b, ch)
    t, n, inv_sigma, r = _gc_transform(c, w1, b1, ln_w, ln_b, eps, w2, b2)
    return x + t.view(b, ch, 1, 1), p, c, n, inv_sigma, r


@gc_add.register_fake
def _(x, wk, bk, w1, b1, ln_w, ln_b, eps, w2, b2):
    b, ch, h, w = x.shape
    hidden = x.new_empty(b, w1.shape[0])
    return (
        torch.empty_like(x),
        x.new_empty(b, 1, h * w),
        x.new_empty(b, ch),
        hidden,
        x.new_empty(b, 1),
        torch.empty_like(hidden),
    )


@torch.library.custom_op("attnzoo::gc_add_backward", mutates_args=())
def gc_add_backward(
    g: Tensor,
    x: Tensor,
    wk: Tensor,
    w1: Tensor,
    ln_w: Tensor,
    w2: Tensor,
    p: Tensor,
    c: Tensor,
    n: Tensor,
    inv_sigma: Tensor,
    r: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`gc_add`'s ``y`` w.r.t. ``x, wk, bk, w1, b1, ln_w, ln_b, w2, b2``."""
    b, ch, h, w = x.shape
    g = g.contiguous()
    flat, g_flat = x.reshape(b, ch, h * w), g.view(b, ch, h * w)
    d_t = g_flat.sum(-1)  # (B, C)
    g_w2, g_b2 = d_t.t() @ r, d_t.sum(0)
    d_pre = (d_t @ w2) * (r > 0).to(r.dtype)  # through the ReLU: (B, P)
    g_ln_w, g_ln_b = (d_pre * n).sum(0), d_pre.sum(0)
    d_n = d_pre * ln_w
    d_h = inv_sigma * (d_n - d_n.mean(1, keepdim=True) - n * (d_n * n).mean(1, keepdim=True))
    g_w1, g_b1 = d_h.t() @ c, d_h.sum(0)
    grad_x, g_wk, dl = _pooling_backward((d_h @ w1).view(b, ch, 1), flat, wk, p, g_flat)
    return (
        grad_x.view(b, ch, h, w),
        g_wk,
        dl.sum().view(1),
        g_w1,
        g_b1,
        g_ln_w,
        g_ln_b,
        g_w2,
        g_b2,
    )


@gc_add_backward.register_fake
def _(g, x, wk, w1, ln_w, w2, p, c, n, inv_sigma, r):
    return (
        torch.empty_like(x),
        torch.empty_like(wk),
        wk.new_empty(1),
        torch.empty_like(w1),
        w1.new_empty(w1.shape[0]),
        torch.empty_like(ln_w),
        torch.empty_like(ln_w),
        torch.empty_like(w2),
        w2.new_empty(w2.shape[0]),
    )


def _gc_add_setup(ctx, inputs, output) -> None:
    x, wk, bk, w1, b1, ln_w, ln_b, eps, w2, b2 = inputs
    ctx.save_for_backward(x, wk, bk, w1, b1, ln_w, ln_b, w2, b2, *output[1:])
    ctx.eps = eps


def _gc_add_backward(ctx, g: Tensor, *unused: Tensor):
    x, wk, bk, w1, b1, ln_w, ln_b, w2, b2, p, c, n, inv_sigma, r = ctx.saved_tensors
    params = [x, wk, bk, w1, b1, ln_w, ln_b, w2, b2]
    if torch.is_grad_enabled():  # create_graph: differentiate the plain formula

        def fn(x_, wk_, bk_, w1_, b1_, ln_w_, ln_b_, w2_, b2_):
            return gc_add_plain(x_, wk_, bk_, w1_, b1_, ln_w_, ln_b_, ctx.eps, w2_, b2_)

        grads = _plain_grads(fn, params, g, create_graph=True)
    else:
        grads = list(gc_add_backward(g, x, wk, w1, ln_w, w2, p, c, n, inv_sigma, r))
        grads = [gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:7])] + [
            gr if need else None for gr, need in zip(grads[7:], ctx.needs_input_grad[8:])
        ]
    return (*grads[:7], None, *grads[7:])


gc_add.register_autograd(_gc_add_backward, setup_context=_gc_add_setup)


# ---------------------------------------------------------------------------------------------
# FLOP formulas (the matmuls and convolutions inside, counted as FlopCounterMode counts them)
@register_flop_formula(torch.ops.attnzoo.cbam)
def _cbam_flops(x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    b, c, h, w = x_shape
    hidden = w1_shape[0]
    conv_w_shape = args[3]
    k = conv_w_shape[-1]
    return 2 * (2 * 2 * b * c * hidden) + 2 * b * h * w * 2 * k * k


@register_flop_formula(torch.ops.attnzoo.cbam_backward)
def _cbam_backward_flops(g_shape, x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _cbam_flops(x_shape, w1_shape, None, None, None, args[2])


@register_flop_formula(torch.ops.attnzoo.eca)
def _eca_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


@register_flop_formula(torch.ops.attnzoo.gc_context)
def _gc_context_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    b, c, h, w = x_shape
    return 2 * 2 * b * c * h * w  # logits and pooling: two matrix-vector products


@register_flop_formula(torch.ops.attnzoo.gc_context_backward)
def _gc_context_backward_flops(g_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    b, c, h, w = x_shape
    return 2 * 4 * b * c * h * w  # dp, dwk, and the rank-2 update


@register_flop_formula(torch.ops.attnzoo.gc_add)
def _gc_add_flops(x_shape, wk_shape, bk_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    b = x_shape[0]
    hidden, c = w1_shape
    return _gc_context_flops(x_shape) + 2 * 2 * b * c * hidden  # + the transform's two products


@register_flop_formula(torch.ops.attnzoo.gc_add_backward)
def _gc_add_backward_flops(g_shape, x_shape, wk_shape, w1_shape, *args, **kwargs) -> int:
    b = x_shape[0]
    hidden, c = w1_shape
    return _gc_context_backward_flops(g_shape, x_shape) + 2 * 2 * 2 * b * c * hidden


@register_flop_formula(torch.ops.attnzoo.eca_backward)
def _eca_backward_flops(g_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _eca_flops(x_shape, w_shape)


# ---------------------------------------------------------------------------------------------
# BatchNorm2d followed by a mean-pooled channel gate (SE, ECA), folded
#
# u = bn(z) is an affine map of z per channel: u = a * (z - mu) + beta with a = gamma / sigma,
# sigma = sqrt(var + eps) (batch statistics in training, running ones in eval). So
#   the pooled descriptor  p = mean_hw(u) = a * (m - mu) + beta   (m = mean_hw(z), per row),
#   the output             y = s * u = A * z + D,  A = s * a,  D = s * (beta - a * mu),
# and BatchNorm's statistics and the row means come out of one pass over z; a second pass
# writes y (u is never written). Backward, with g = dL/dy, G1 = sum_hw g, G2 = sum_hw g * z
# (one pass) and gp = dL/dp from the gate's backward on (B, C):
#   grad_s = a * (G2 - mu * G1) + beta * G1,
#   du = s * g + gp / n  (n = H * W), whose row sums are s * G1 + gp and whose row sums against
#   (z - mu) are s * (G2 - mu * G1) + gp * (m - mu); summed over the batch: S and T per channel;
#   dbeta = S, dgamma = T / sigma, and (one more pass)
#   dz = a * (du - S / N - (z - mu) * T / (N * sigma^2)) in training (N = B * H * W),
#   dz = a * du in eval; i.e. dz = P * g + R * z + Q with per-row P, R, Q.
_GATES = ("se", "eca")


def _gate_logits(
    p: Tensor, kind: str, w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None
) -> Tensor:
    """The gate's logits for descriptors ``p`` ``(B, C)``: SE ``fc2(relu(fc1(p)))``, ECA
    ``conv1d`` across channels (``w1`` the ``(1, 1, k)`` kernel)."""
    if kind == "se":
        return F.linear(F.relu(F.linear(p, w1, b1)), w2, b2)
    return _channel_conv(p, w1)


def bn_gate_plain(
    z: Tensor,
    bn_w: Tensor,
    bn_b: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
    kind: str,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor | None,
    b2: Tensor | None,
) -> Tensor:
    """``u * sigmoid(logits(mean_hw(u)))`` with ``u = batch_norm(z)``, with torch ops (running
    statistics are read, never updated)."""
    stats = (None, None) if use_batch_stats else (running_mean, running_var)
    u = F.batch_norm(z, *stats, bn_w, bn_b, use_batch_stats, 0.0, eps)
    s = torch.sigmoid(_gate_logits(u.mean((2, 3)), kind, w1, b1, w2, b2))
    return u * s[:, :, None, None]


def _row_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per (sample, channel): the mean and the sum of squared deviations, ``(B, C)`` each."""
    b, c, h, w = z.shape
    if kernels.usable(z):
        mean, m2 = kernels.rows_mean_m2(z)
        return mean.view(b, c), m2.view(b, c)
    var, mean = torch.var_mean(z, (2, 3), correction=0)
    return mean, var * (h * w)


@torch.library.custom_op("attnzoo::bn_gate", mutates_args=())
def bn_gate(
    z: Tensor,
    bn_w: Tensor,
    bn_b: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    eps: float,
    kind: str,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor | None,
    b2: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BatchNorm2d then an SE / ECA gate, folded (section comment above). Returns ``y`` and what
    the backward needs: the gate ``s`` and descriptors ``p`` ``(B, C)``, the row means ``(B, C)``,
    and the mean and (biased) variance the normalisation used ``(C,)``: the batch's with
    ``use_batch_stats`` (from which the caller updates the running statistics: the op is
    functional), else copies of the running ones."""
    if kind not in _GATES:
        raise ValueError(f"attnzoo::bn_gate: kind must be one of {_GATES}, got {kind!r}")
    b, c, h, w = z.shape
    n = h * w
    row_mean, row_m2 = _row_stats(z)
    if use_batch_stats:  # Chan et al.'s combination of the per-row (mean, M2), in float64
        rm = row_mean.double()
        mean = rm.mean(0)
        var = (row_m2.double().sum(0) + n * (rm - mean).square().sum(0)) / (b * n)
        mean, var = mean.to(z.dtype), var.to(z.dtype)
    else:
        mean, var = running_mean.clone(), running_var.clone()
    a = bn_w / (var + eps).sqrt()
    p = a * (row_mean - mean) + bn_b
    s = torch.sigmoid(_gate_logits(p, kind, w1, b1, w2, b2))
    scale, shift = s * a, s * (bn_b - a * mean)
    if kernels.usable(z, scale, shift):
        y = kernels.rows_scale_shift(z, scale, shift)
    else:
        y = torch.addcmul(shift[:, :, None, None], z, scale[:, :, None, None])
    return y, s, p, row_mean, mean, var


@bn_gate.register_fake
def _(z, bn_w, bn_b, running_mean, running_var, use_batch_stats, eps, kind, w1, b1, w2, b2):
    b, c = z.shape[:2]
    row = z.new_empty(b, c)
    return (
        torch.empty_like(z),
        row,
        torch.empty_like(row),
        torch.empty_like(row),
        z.new_empty(c),
        z.new_empty(c),
    )


@torch.library.custom_op("attnzoo::bn_gate_backward", mutates_args=())
def bn_gate_backward(
    g: Tensor,
    z: Tensor,
    bn_w: Tensor,
    bn_b: Tensor,
    use_batch_stats: bool,
    eps: float,
    kind: str,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor | None,
    s: Tensor,
    p: Tensor,
    row_mean: Tensor,
    mean: Tensor,
    var: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`bn_gate`'s ``y`` w.r.t. ``z, bn_w, bn_b, w1, b1, w2, b2`` (ECA: ``w1``
    only; placeholders for the absent ``b1, w2, b2``; SE without biases: their would-be
    gradients, which the caller drops)."""
    b, c, h, w = z.shape
    n = h * w
    g = g.contiguous()
    fused = kernels.usable(g, z)
    if fused:
        g1, g2 = (t.view(b, c) for t in kernels.rows_sum_dot(g, z))
    else:
        g1, g2 = g.sum((2, 3)), (g * z).sum((2, 3))
    sigma = (var + eps).sqrt()
    a = bn_w / sigma
    centred = g2 - mean * g1  # sum_hw g * (z - mu)
    d_logits = (a * centred + bn_b * g1) * s * (1 - s)
    if kind == "se":
        pre = F.linear(p, w1, b1)
        g_w2, g_b2 = d_logits.t() @ pre.clamp_min(0), d_logits.sum(0)
        d_pre = (d_logits @ w2) * (pre > 0).to(pre.dtype)
        g_w1, g_b1, gp = d_pre.t() @ p, d_pre.sum(0), d_pre @ w1
    else:
        gp, g_w1 = _channel_conv_backward(d_logits, p, w1)
        g_b1, g_w2, g_b2 = w1.new_zeros(1), w1.new_zeros(0), w1.new_zeros(0)
    big_s = (s * g1 + gp).sum(0)
    big_t = (s * centred + gp * (row_mean - mean)).sum(0)
    scale_g = (a * s).contiguous()
    if use_batch_stats:
        total = b * n
        scale_z = (-a * big_t / (total * sigma.square())).expand(b, c)
        shift = a * gp / n - a * big_s / total - scale_z * mean
    else:
        scale_z, shift = torch.zeros_like(s), a * gp / n
    scale_z, shift = scale_z.contiguous(), shift.contiguous()
    if fused and kernels.usable(scale_g, scale_z, shift):
        grad_z = kernels.rows_affine2(g, z, scale_g, scale_z, shift)
    else:
        grad_z = (
            scale_g[:, :, None, None] * g + scale_z[:, :, None, None] * z + shift[:, :, None, None]
        )
    return grad_z, big_t / sigma, big_s, g_w1, g_b1, g_w2, g_b2


@bn_gate_backward.register_fake
def _(g, z, bn_w, bn_b, use_batch_stats, eps, kind, w1, b1, w2, s, p, row_mean, mean, var):
    if kind == "se":
        return (
            torch.empty_like(z),
            torch.empty_like(bn_w),
            torch.empty_like(bn_b),
            torch.empty_like(w1),
            w1.new_empty(w1.shape[0]),
            torch.empty_like(w2),
            w2.new_empty(w2.shape[0]),
        )
    return (
        torch.empty_like(z),
        torch.empty_like(bn_w),
        torch.empty_like(bn_b),
        torch.empty_like(w1),
        w1.new_empty(1),
        w1.new_empty(0),
        w1.new_empty(0),
    )


def _bn_gate_setup(ctx, inputs, output) -> None:
    (z, bn_w, bn_b, running_mean, running_var, use_batch_stats, eps, kind, w1, b1, w2, b2) = inputs
    keep = not use_batch_stats
    ctx.save_for_backward(
        z,
        bn_w,
        bn_b,
        w1,
        b1,
        w2,
        b2,
        running_mean if keep else None,
        running_var if keep else None,
        *output[1:],
    )
    ctx.flags = (use_batch_stats, eps, kind)


def _bn_gate_backward(ctx, g: Tensor, *unused: Tensor):
    (z, bn_w, bn_b, w1, b1, w2, b2, running_mean, running_var, s, p, row_mean, mean, var) = (
        ctx.saved_tensors
    )
    use_batch_stats, eps, kind = ctx.flags
    params = [z, bn_w, bn_b, w1, b1, w2, b2]
    if torch.is_grad_enabled():  # create_graph: differentiate the plain formula

        def fn(z_, bn_w_, bn_b_, w1_, b1_, w2_, b2_):
            return bn_gate_plain(
                z_,
                bn_w_,
                bn_b_,
                running_mean,
                running_var,
                use_batch_stats,
                eps,
                kind,
                w1_,
                b1_,
                w2_,
                b2_,
            )

        grads = _plain_grads(fn, params, g, create_graph=True)
    else:
        grads = list(
            bn_gate_backward(
                g, z, bn_w, bn_b, use_batch_stats, eps, kind, w1, b1, w2, s, p, row_mean, mean, var
            )
        )
        grads = [gr if t is not None else None for gr, t in zip(grads, params)]
    z_g, bn_w_g, bn_b_g, w1_g, b1_g, w2_g, b2_g = grads
    return z_g, bn_w_g, bn_b_g, None, None, None, None, None, w1_g, b1_g, w2_g, b2_g


bn_gate.register_autograd(_bn_gate_backward, setup_context=_bn_gate_setup)


@register_flop_formula(torch.ops.attnzoo.bn_gate)
def _bn_gate_flops(
    z_shape,
    bn_w_shape,
    bn_b_shape,
    rm_shape,
    rv_shape,
    use_batch_stats,
    eps,
    kind,
    w1_shape,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    b, c = z_shape[:2]
    if kind == "se":  # two (B, C) x (C, h) matmuls
        return 2 * 2 * b * c * w1_shape[0]
    return 2 * b * c * w1_shape[-1]


@register_flop_formula(torch.ops.attnzoo.bn_gate_backward)
def _bn_gate_backward_flops(
    g_shape,
    z_shape,
    bn_w_shape,
    bn_b_shape,
    use_batch_stats,
    eps,
    kind,
    w1_shape,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return 2 * _bn_gate_flops(z_shape, None, None, None, None, None, None, kind, w1_shape)
