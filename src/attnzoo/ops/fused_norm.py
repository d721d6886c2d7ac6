"""BatchNorm followed by a mean-pooled channel gate (SE, ECA), fused.

In a residual block the gate sits right after the last BatchNorm (``u = bn(z)``, then
``y = u * gate(mean_hw(u))``). Done op by op, the gate costs three more passes over the feature
map forward (the mean, the multiply) and several backward, on top of BatchNorm's own. But every
quantity the gate needs is an affine function of BatchNorm's input ``z`` per (sample, channel):

* ``u = a * (z - mu) + beta`` with ``a = gamma / sqrt(var + eps)`` per channel, so the pooled
  descriptor is ``p = a * (mean_hw(z) - mu) + beta``: the per-row means come out of the same pass
  that computes BatchNorm's batch statistics;
* ``y = s * u = A * z + D`` with ``A = s * a`` and ``D = s * (beta - a * mu)`` per (sample,
  channel): BatchNorm's output pass writes ``y`` directly, ``u`` is never materialised;
* backward, with ``g = dL/dy`` and ``gp = dL/dp`` (from the gate's own backward): every
  gradient needs only the per-row sums ``G1 = sum_hw g`` and ``G2 = sum_hw g * z`` (one pass),
  and ``dL/dz = P * g + R * z + Q`` with per-row coefficients (one more pass):
  ``grad_s = a * (G2 - mu * G1) + beta * G1``; with ``du = s * g + gp / n`` (``n = H * W``),
  ``sum du = s * G1 + gp`` and ``sum du * (z - mu) = s * (G2 - mu * G1) + gp * (m - mu)`` per row
  (``m`` the row mean), summed over the batch per channel (``S``, ``T``); then
  ``dbeta = S``, ``dgamma = T / sigma`` and, in training,
  ``dz = a * (du - S / N - (z - mu) * T / (N * sigma^2))``; in eval ``dz = a * du``.

So BatchNorm + gate costs what BatchNorm alone costs: two passes forward, two backward. The
result equals ``gate_module(bn(z))`` up to float rounding, running statistics included (the
momentum update with the unbiased batch variance, ``momentum=None``'s cumulative average,
``num_batches_tracked``).

Used by attached residual blocks (:func:`attnzoo.models.attach`) when the attention is SE or
ECA and the norm before it is a plain :class:`torch.nn.BatchNorm2d`; :func:`fusable` lists the
conditions (eager mode, the fused kernels usable for ``z``, no hooks that the fused path would
skip, ...). Anything else runs the two modules one after the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnzoo.ops import kernels
from attnzoo.ops.gates import eager, has_hooks
from attnzoo.ops.validation import check_input

__all__ = ["batch_statistics", "batchnorm_mean_gate", "fusable", "mean_gate_after_batchnorm"]


def fusable(norm: nn.Module, gate_module: nn.Module, z: Tensor) -> bool:
    """Whether :func:`batchnorm_mean_gate` may replace ``gate_module(norm(z))``.

    ``norm`` is exactly :class:`torch.nn.BatchNorm2d` (not a subclass such as timm's
    ``BatchNormAct2d``) over ``z``'s channels; eager mode; the kernels usable for ``z`` (float32,
    contiguous, CPU); no forward or backward hooks on either module or their submodules (or
    global ones), which the fused path would not call; in training, more than one value per channel (else BatchNorm's own error).
    """
    if not eager():
        return False
    if type(norm) is not nn.BatchNorm2d or z.dim() != 4 or z.shape[1] != norm.num_features:
        return False
    if norm.training and z.shape[0] * z.shape[2] * z.shape[3] <= 1:
        return False
    if torch.is_autocast_enabled(z.device.type):
        return False
    if has_hooks(norm, gate_module):
        return False
    params = [t for t in (norm.weight, norm.bias) if t is not None]
    return kernels.usable(z, *params)


def batch_statistics(norm: nn.BatchNorm2d, z: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(row means ``(B, C, 1, 1)``, channel mean ``(1, C, 1, 1)``, channel variance used for
    normalising, whether batch statistics are used); updates the running statistics as
    :class:`torch.nn.BatchNorm2d` does."""
    use_batch = norm.training or norm.running_mean is None
    if not use_batch:
        return (kernels.rows_mean_m2(z)[0], norm.running_mean.view(1, -1, 1, 1),
                norm.running_var.view(1, -1, 1, 1), False)
    row_mean, row_m2 = kernels.rows_mean_m2(z)
    b, _, h, w = z.shape
    n, total = h * w, b * h * w
    # Chan et al.'s pairwise combination of the per-row (mean, M2), in float64.
    rm, rm2 = row_mean.double(), row_m2.double()
    mean = rm.mean(0, keepdim=True)
    m2 = rm2.sum(0, keepdim=True) + n * (rm - mean).square().sum(0, keepdim=True)
    var = m2 / total
    if norm.training and norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:
                factor = 1.0 / float(norm.num_batches_tracked)
            else:
                factor = norm.momentum
            norm.running_mean.lerp_(mean.view(-1).to(norm.running_mean.dtype), factor)
            unbiased = (m2 / (total - 1)).view(-1).to(norm.running_var.dtype)
            norm.running_var.lerp_(unbiased, factor)
    return row_mean, mean.to(z.dtype), var.to(z.dtype), True


class _Shared:
    """What the two autograd functions below pass each other."""

    __slots__ = ("G1", "G2", "a", "batch", "beta", "g", "mu", "row_mean", "s", "sigma")


def batchnorm_mean_gate(norm: nn.BatchNorm2d, z: Tensor,
                        gate_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``u * gate_fn(u.mean((2, 3), keepdim=True))`` with ``u = norm(z)``, fused (module
    docstring). ``z`` ``(B, C, H, W)``; ``gate_fn`` maps ``(B, C, 1, 1)`` to a gate of the same
    shape (SE's and ECA's ``_gate``). Check :func:`fusable` first."""
    row_mean, mu, var, batch = batch_statistics(norm, z)
    shared = _Shared()
    sigma = (var + norm.eps).sqrt()
    gamma = norm.weight if norm.weight is not None else torch.ones_like(sigma.view(-1))
    beta = norm.bias if norm.bias is not None else torch.zeros_like(sigma.view(-1))
    shared.mu, shared.sigma, shared.row_mean, shared.batch = mu, sigma, row_mean, batch
    pooled = _NormPool.apply(z, gamma, beta, shared)
    s = gate_fn(pooled)
    return _NormScale.apply(z, s, pooled, shared)


def mean_gate_after_batchnorm(module: nn.Module, name: str, norm: nn.Module,
                              z: Tensor) -> Tensor:
    """``module(norm(z))`` for a mean-pooled gate module (SE, ECA: ``channels``, ``_gate``,
    ``forward(x, inplace=)``), where the caller owns ``norm(z)``: fused with the BatchNorm when
    :func:`fusable`, else the two modules one after the other, the gate writing into the
    BatchNorm's output at inference unless it has hooks (which may keep their input)."""
    if fusable(norm, module, z):
        check_input(name, z, module.channels)
        return batchnorm_mean_gate(norm, z, module._gate)
    return module(norm(z), inplace=not has_hooks(module))


class _NormPool(torch.autograd.Function):
    """``p = a * (row_mean - mu) + beta``; backward: ``dL/dz``, ``dgamma``, ``dbeta`` (the whole
    gradient of BatchNorm + gate w.r.t. its inputs, once ``_NormScale`` handed over ``g``)."""

    @staticmethod
    def forward(ctx, z: Tensor, gamma: Tensor, beta: Tensor, shared: _Shared) -> Tensor:
        a = gamma.view(1, -1, 1, 1) / shared.sigma
        shared.a, shared.beta = a, beta.view(1, -1, 1, 1)
        ctx.shared = shared
        ctx.save_for_backward(z)
        return a * (shared.row_mean - shared.mu) + shared.beta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gp: Tensor):
        (z,) = ctx.saved_tensors
        sh = ctx.shared
        b, c, h, w = z.shape
        n, total = h * w, b * h * w
        s, g = sh.s, sh.g
        if g is None:  # the output's gradient never arrived: only the pooled path contributes
            s, g_sum, g_dot = torch.zeros_like(gp), torch.zeros_like(gp), torch.zeros_like(gp)
        else:
            g_sum, g_dot = sh.G1, sh.G2
        centred_dot = g_dot - sh.mu * g_sum                       # sum_hw g * (z - mu)
        du_sum = s * g_sum + gp                                   # sum_hw du, per row
        du_dev = s * centred_dot + gp * (sh.row_mean - sh.mu)     # sum_hw du * (z - mu)
        S = du_sum.sum(0, keepdim=True)
        T = du_dev.sum(0, keepdim=True)
        grad_gamma = (T / sh.sigma).view(-1) if ctx.needs_input_grad[1] else None
        grad_beta = S.view(-1) if ctx.needs_input_grad[2] else None
        grad_z = None
        if ctx.needs_input_grad[0]:
            a = sh.a
            P = (a * s).expand(b, c, 1, 1)
            Q = a * gp / n
            if sh.batch:
                R = -a * T / (total * sh.sigma.square())
                Q = Q - a * S / total - R * sh.mu
            else:
                R = torch.zeros_like(a)
            if g is None:
                g = torch.zeros_like(z)
            grad_z = kernels.rows_affine2(g, z, P.contiguous(), R.expand(b, c, 1, 1).contiguous(),
                                          Q.expand(b, c, 1, 1).contiguous())
        sh.g = sh.s = sh.G1 = sh.G2 = None
        return grad_z, grad_gamma, grad_beta, None


class _NormScale(torch.autograd.Function):
    """``y = A * z + D`` (``A = s * a``, ``D = s * (beta - a * mu)``); backward:
    ``grad_s = a * (G2 - mu * G1) + beta * G1`` from one pass over ``g`` and ``z``; the gradient
    of ``z`` is left to :class:`_NormPool` (``pooled`` is an input so that it runs after)."""

    @staticmethod
    def forward(ctx, z: Tensor, s: Tensor, pooled: Tensor, shared: _Shared) -> Tensor:
        a, beta, mu = shared.a, shared.beta, shared.mu
        ctx.shared = shared
        ctx.save_for_backward(z, s)
        b, c = z.shape[:2]
        scale = (s * a).expand(b, c, 1, 1).contiguous()
        shift = (s * (beta - a * mu)).expand(b, c, 1, 1).contiguous()
        return kernels.rows_scale_shift(z, scale, shift)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        z, s = ctx.saved_tensors
        sh = ctx.shared
        g = g.contiguous()
        g_sum, g_dot = kernels.rows_sum_dot(g, z)
        sh.g, sh.s, sh.G1, sh.G2 = g, s, g_sum, g_dot
        grad_s = sh.a * (g_dot - sh.mu * g_sum) + sh.beta * g_sum
        return None, grad_s, None, None
