"""Fused CPU loops behind :mod:`attnzoo.fast`'s custom ops, compiled on first use.

The gating modules are memory-bound: passes over the feature map are their cost, and plain torch
ops make one pass per op. ``_kernels.c`` (next to this file) holds a few loops that do in one pass
what takes torch two or three: the mean and the max of every row together, row-wise dot products
without materialising the product, CBAM's channel statistics of ``x * s`` without writing
``x * s``, CBAM's two gates applied in one multiply, CBAM's backward in three passes, and its 7x7
``2 -> 1`` convolution without oneDNN's fixed costs; and for BatchNorm folding, per-row mean and
squared deviations in one pass, ``sum g`` and ``sum g * x`` in one pass, ``a * g + b * x + c`` in
one pass.

Build: plain C99 + OpenMP (no Python or torch headers), compiled once per machine with the system
C compiler (``$CC``, default ``cc``; ``-O3 -march=native -fopenmp``, else without
``-march=native``, else without OpenMP: one thread) into a cache directory and loaded with
:mod:`ctypes`. This is deliberate rather than ``torch.utils.cpp_extension``: a C file without
torch headers compiles in about a second (a C++ extension against torch's headers takes about a
minute on two cores), does not depend on torch's C++ ABI, and needs no ninja. The library links
``libgomp.so.1`` by name, which resolves to the copy torch's Linux wheels already loaded (one
OpenMP runtime, one thread pool), and every call passes ``torch.get_num_threads()``.

If there is no compiler or compiling fails, :func:`available` returns False (with one warning)
and the custom ops compute the plain torch formula. The cache directory is
``$ATTNZOO_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnzoo``, else ``~/.cache/attnzoo``; the library
file is named after a hash of the source, the compiler's version, the flags and the CPU (model and
instruction-set flags, so a cache shared between machines never loads code built for another
CPU), and written atomically (concurrent first uses are safe).

The kernels take float32, contiguous (NCHW) CPU tensors; :func:`usable` tells whether tensors
qualify.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available",
    "cbam_grad_channel",
    "cbam_grad_input",
    "cbam_grad_spatial",
    "channel_mean_max_scaled",
    "conv_same",
    "rows_affine2",
    "rows_dot",
    "rows_mean_m2",
    "rows_mean_max",
    "rows_scale_shift",
    "rows_sum_dot",
    "scale_channel_spatial",
    "unavailable_reason",
    "usable",
]

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS_NATIVE = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_FLAGS_PORTABLE = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
#: last resort for compilers without OpenMP (e.g. Apple clang): the pragmas are ignored and the
#: loops run on one thread
_FLAGS_SERIAL = ["-O3", "-shared", "-fPIC", "-std=c99"]
_log = logging.getLogger("attnzoo")

_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are unavailable, once tried
_tried = False

#: widest padded row :func:`conv_same` takes (``W + k - 1``; ``AZ_MAX_ROW`` in ``_kernels.c``)
MAX_CONV_ROW = 4096

_L, _P, _I = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "az_rows_mean_max": [_P, _L, _L, _P, _P, _I],
    "az_rows_dot": [_P, _P, _L, _L, _P, _I],
    "az_rows_scale_shift": [_P, _P, _P, _L, _L, _P, _I],
    "az_rows_mean_m2": [_P, _L, _L, _P, _P, _I],
    "az_rows_sum_dot": [_P, _P, _L, _L, _P, _P, _I],
    "az_rows_affine2": [_P, _P, _P, _P, _P, _L, _L, _P, _I],
    "az_cbam_grad_spatial": [_P, _P, _P, _P, _L, _L, _L, _P, _P, _I],
    "az_cbam_grad_channel": [_P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _P, _P, _I],
    "az_cbam_grad_input": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _P, _I],
    "az_channel_mean_max_scaled": [_P, _P, _L, _L, _L, _P, _P, _I],
    "az_scale_channel_spatial": [_P, _P, _P, _L, _L, _L, _P, _I],
    "az_conv_same": [_P, _P, _L, _L, _L, _L, _L, _P, _I],
}


def _cache_dir() -> Path:
    if os.environ.get("ATTNZOO_CACHE_DIR"):
        return Path(os.environ["ATTNZOO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnzoo"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` code is CPU-specific)."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                elif not line.strip() and lines:
                    break  # the first processor is enough
    except OSError:
        pass
    return "\n".join(lines) or f"{platform.machine()} {platform.processor()}"


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else cc


def _compile(cc: str, flags: list[str], target: Path) -> None:
    """Compile ``_kernels.c`` into ``target`` atomically (a temp file, then ``os.replace``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *flags, str(_SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:] or f"{cc} exited {result.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_load() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; set $CC)")
    version = _compiler_version(cc)
    errors = []
    for flags in (_FLAGS_NATIVE, _FLAGS_PORTABLE, _FLAGS_SERIAL):
        key = hashlib.sha256(
            "\n".join(
                [_SOURCE.read_text(), version, " ".join(flags), sys.platform, _cpu_identity()]
            ).encode()
        ).hexdigest()
        target = _cache_dir() / f"kernels-{key[:16]}.so"
        try:
            if not target.exists():
                _compile(cc, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(f"{' '.join(flags)}: {error}")
            continue
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        return lib
    raise RuntimeError("compiling the kernels failed:\n" + "\n".join(errors))


def available() -> bool:
    """Whether the fused kernels are compiled and loaded (compiles them on the first call;
    one warning when they cannot be built)."""
    global _lib, _reason, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _build_and_load()
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            _reason = str(error)
            _log.warning(
                "attnzoo.fast: fused CPU kernels unavailable, using plain torch ops (%s)",
                _reason.splitlines()[0],
            )
    return _lib is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (``None`` when the kernels are loaded or not yet tried)."""
    return _reason


def usable(*tensors: Tensor) -> bool:
    """True when the kernels are available and every tensor is float32, contiguous, non-empty
    and on the CPU."""
    return (
        all(
            t.dtype == torch.float32
            and t.device.type == "cpu"
            and t.is_contiguous()
            and t.numel() > 0
            for t in tensors
        )
        and available()
    )


def _require(name: str, *tensors: Tensor) -> None:
    """Raise unless the kernels are loaded and every tensor is float32, contiguous, non-empty
    and on the CPU (the loops index raw memory: anything else would read wrong or
    out-of-bounds data)."""
    if not available():
        raise RuntimeError(
            f"attnzoo.fast.kernels.{name}: the kernels are unavailable ({unavailable_reason()})"
        )
    for t in tensors:
        if (
            t.dtype != torch.float32
            or t.device.type != "cpu"
            or not t.is_contiguous()
            or t.numel() == 0
        ):
            raise ValueError(
                f"attnzoo.fast.kernels.{name}: tensors must be float32, contiguous "
                f"(NCHW), non-empty and on the CPU; got {t.dtype}, {t.device}, "
                f"shape {tuple(t.shape)}, strides {t.stride()}"
            )


def _require_numel(name: str, what: str, t: Tensor, numel: int) -> None:
    if t.numel() != numel:
        raise ValueError(
            f"attnzoo.fast.kernels.{name}: {what} must hold {numel} values; got "
            f"shape {tuple(t.shape)}"
        )


def _nt() -> int:
    return torch.get_num_threads()


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _rows(name: str, x: Tensor) -> tuple[int, int, tuple[int, ...]]:
    """(rows ``B * C``, row length, shape of a per-row tensor) for ``x`` ``(B, C, *spatial)``."""
    if x.dim() < 3:
        raise ValueError(
            f"attnzoo.fast.kernels.{name}: expected (B, C, *spatial); got shape {tuple(x.shape)}"
        )
    rows = x.shape[0] * x.shape[1]
    return rows, x.numel() // max(rows, 1), x.shape[:2] + (1,) * (x.dim() - 2)


def _same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"attnzoo.fast.kernels.{name}: both maps must have the same shape; got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def _image(name: str, x: Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(
            f"attnzoo.fast.kernels.{name}: expected (B, C, H, W); got shape {tuple(x.shape)}"
        )
    return tuple(x.shape)


def rows_mean_max(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max over the spatial dims, one pass: ``x`` ``(B, C, *spatial)`` -> two
    ``(B, C, 1, ..., 1)`` tensors (``x.mean(dims, keepdim=True)``, ``x.amax(...)``)."""
    _require("rows_mean_max", x)
    rows, n, shape = _rows("rows_mean_max", x)
    mean, mx = x.new_empty(shape), x.new_empty(shape)
    _lib.az_rows_mean_max(_ptr(x), rows, n, _ptr(mean), _ptr(mx), _nt())
    return mean, mx


def rows_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(spatial dims, keepdim=True)`` without materialising ``a * b``: ``a``, ``b``
    ``(B, C, *spatial)`` of the same shape -> ``(B, C, 1, ..., 1)``."""
    _require("rows_dot", a, b)
    _same_shape("rows_dot", a, b)
    rows, n, shape = _rows("rows_dot", a)
    out = a.new_empty(shape)
    _lib.az_rows_dot(_ptr(a), _ptr(b), rows, n, _ptr(out), _nt())
    return out


def rows_mean_m2(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``x`` ``(B, C, *spatial)``, one pass: the mean and the sum of squared deviations
    from it, two ``(B, C, 1, ..., 1)`` tensors (``x.var(dims, correction=0) * n`` for ``m2``)."""
    _require("rows_mean_m2", x)
    rows, n, shape = _rows("rows_mean_m2", x)
    mean, m2 = x.new_empty(shape), x.new_empty(shape)
    _lib.az_rows_mean_m2(_ptr(x), rows, n, _ptr(mean), _ptr(m2), _nt())
    return mean, m2


def rows_sum_dot(g: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``g.sum(spatial dims)`` and ``(g * x).sum(spatial dims)`` in one pass (``keepdim``), for
    ``g``, ``x`` ``(B, C, *spatial)`` of the same shape."""
    _require("rows_sum_dot", g, x)
    _same_shape("rows_sum_dot", g, x)
    rows, n, shape = _rows("rows_sum_dot", g)
    total, dot = g.new_empty(shape), g.new_empty(shape)
    _lib.az_rows_sum_dot(_ptr(g), _ptr(x), rows, n, _ptr(total), _ptr(dot), _nt())
    return total, dot


def rows_affine2(g: Tensor, x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a * g + b * x + c`` for maps ``g``, ``x`` ``(B, C, *spatial)`` and per-row ``a``, ``b``,
    ``c`` (contiguous, ``B * C`` values each), one pass."""
    _require("rows_affine2", g, x, a, b, c)
    _same_shape("rows_affine2", g, x)
    rows, n, _ = _rows("rows_affine2", g)
    for what, t in (("a", a), ("b", b), ("c", c)):
        _require_numel("rows_affine2", what, t, rows)
    out = torch.empty_like(g)
    _lib.az_rows_affine2(_ptr(g), _ptr(x), _ptr(a), _ptr(b), _ptr(c), rows, n, _ptr(out), _nt())
    return out


def rows_scale_shift(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a * x + b`` for a map ``x`` ``(B, C, *spatial)`` and per-row ``a``, ``b`` (contiguous,
    ``B * C`` values each), one pass (``torch.addcmul`` with broadcast per-row operands is
    several times slower on CPU)."""
    _require("rows_scale_shift", x, a, b)
    rows, n, _ = _rows("rows_scale_shift", x)
    for what, t in (("a", a), ("b", b)):
        _require_numel("rows_scale_shift", what, t, rows)
    out = torch.empty_like(x)
    _lib.az_rows_scale_shift(_ptr(x), _ptr(a), _ptr(b), rows, n, _ptr(out), _nt())
    return out


def channel_mean_max_scaled(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """``(x * s).mean(1, keepdim=True)`` and ``(x * s).amax(1, keepdim=True)`` without writing
    ``x * s``: ``x`` ``(B, C, H, W)``, channel gate ``s`` ``(B, C, 1, 1)`` -> two
    ``(B, 1, H, W)``."""
    _require("channel_mean_max_scaled", x, s)
    b, c, h, w = _image("channel_mean_max_scaled", x)
    _require_numel("channel_mean_max_scaled", "s", s, b * c)
    mean, mx = x.new_empty(b, 1, h, w), x.new_empty(b, 1, h, w)
    _lib.az_channel_mean_max_scaled(_ptr(x), _ptr(s), b, c, h * w, _ptr(mean), _ptr(mx), _nt())
    return mean, mx


def scale_channel_spatial(x: Tensor, s: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
    """``(x * s) * a`` in one pass: ``x`` ``(B, C, H, W)``, ``s`` ``(B, C, 1, 1)``, ``a``
    ``(B, 1, H, W)`` -> ``(B, C, H, W)``, written into ``out`` if given (``x`` itself is fine:
    every element is read before it is written)."""
    out = torch.empty_like(x) if out is None else out
    _require("scale_channel_spatial", x, s, a, out)
    b, c, h, w = _image("scale_channel_spatial", x)
    _same_shape("scale_channel_spatial", x, out)
    _require_numel("scale_channel_spatial", "s", s, b * c)
    _require_numel("scale_channel_spatial", "a", a, b * h * w)
    _lib.az_scale_channel_spatial(_ptr(x), _ptr(s), _ptr(a), b, c, h * w, _ptr(out), _nt())
    return out


def conv_same(x: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(x, weight, padding=k // 2)`` for one output channel, odd ``k``, no bias:
    ``x`` ``(B, Cin, H, W)``, ``weight`` ``(1, Cin, k, k)`` -> ``(B, 1, H, W)``."""
    _require("conv_same", x, weight)
    b, cin, h, w = _image("conv_same", x)
    k = weight.shape[-1]
    if w + k - 1 > MAX_CONV_ROW or k % 2 == 0 or weight.shape != (1, cin, k, k):
        raise ValueError(
            f"attnzoo.fast.kernels.conv_same: weight must be (1, {cin}, k, k) with k "
            f"odd and W + k - 1 <= {MAX_CONV_ROW}; got weight "
            f"{tuple(weight.shape)} for input {tuple(x.shape)}"
        )
    out = x.new_empty(b, 1, h, w)
    _lib.az_conv_same(_ptr(x), _ptr(weight), b, cin, h, w, k, _ptr(out), _nt())
    return out


# ---- CBAM's backward: y = (x * s) * a, v = x * s never stored ----------------------------------
def _cbam_check(
    name: str, x: Tensor, g: Tensor, s: Tensor, pixel: dict[str, Tensor], row: dict[str, Tensor]
) -> tuple[int, int, int]:
    _require(name, x, g, s, *pixel.values(), *row.values())
    _same_shape(name, g, x)
    b, c, h, w = _image(name, x)
    _require_numel(name, "s", s, b * c)
    for what, t in pixel.items():
        _require_numel(name, what, t, b * h * w)
    for what, t in row.items():
        _require_numel(name, what, t, b * c)
    return b, c, h * w


def cbam_grad_spatial(g: Tensor, x: Tensor, s: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel: ``grad_a = sum_c s * g * x`` and the number of channels where ``x * s`` equals
    its maximum ``M`` over channels (the forward's spatial max pool); ``(B, 1, H, W)`` each."""
    b, c, p = _cbam_check("cbam_grad_spatial", x, g, s, {"M": M}, {})
    grad_a, cnt = x.new_empty(b, 1, *x.shape[2:]), x.new_empty(b, 1, *x.shape[2:])
    _lib.az_cbam_grad_spatial(
        _ptr(g), _ptr(x), _ptr(s), _ptr(M), b, c, p, _ptr(grad_a), _ptr(cnt), _nt()
    )
    return grad_a, cnt


def cbam_grad_channel(
    g: Tensor, x: Tensor, s: Tensor, a: Tensor, gm_c: Tensor, M: Tensor, share: Tensor, mrow: Tensor
) -> tuple[Tensor, Tensor]:
    """Per row: ``grad_s = sum_p x * dL/dv`` with ``dL/dv = g * a + gm_c + [x * s == M] * share``
    (``gm_c`` = the spatial mean pool's gradient / C, ``share`` = the spatial max pool's gradient
    / tie count, per pixel) and the number of pixels where ``x`` equals its row maximum
    ``mrow``; ``(B, C, 1, 1)`` each."""
    b, c, p = _cbam_check(
        "cbam_grad_channel", x, g, s, {"a": a, "gm_c": gm_c, "M": M, "share": share}, {"mrow": mrow}
    )
    grad_s, rowcnt = x.new_empty(b, c, 1, 1), x.new_empty(b, c, 1, 1)
    _lib.az_cbam_grad_channel(
        _ptr(g),
        _ptr(x),
        _ptr(s),
        _ptr(a),
        _ptr(gm_c),
        _ptr(M),
        _ptr(share),
        _ptr(mrow),
        b,
        c,
        p,
        _ptr(grad_s),
        _ptr(rowcnt),
        _nt(),
    )
    return grad_s, rowcnt


def cbam_grad_input(
    g: Tensor,
    x: Tensor,
    s: Tensor,
    a: Tensor,
    gm_c: Tensor,
    M: Tensor,
    share: Tensor,
    mrow: Tensor,
    gmean_p: Tensor,
    gmax_share: Tensor,
) -> Tensor:
    """``grad_x = dL/dv * s + gmean_p + [x == mrow] * gmax_share`` (``gmean_p`` = the channel
    mean pool's gradient / (H * W), ``gmax_share`` = the channel max pool's gradient / tie count,
    per row), one pass."""
    b, c, p = _cbam_check(
        "cbam_grad_input",
        x,
        g,
        s,
        {"a": a, "gm_c": gm_c, "M": M, "share": share},
        {"mrow": mrow, "gmean_p": gmean_p, "gmax_share": gmax_share},
    )
    out = torch.empty_like(x)
    _lib.az_cbam_grad_input(
        _ptr(g),
        _ptr(x),
        _ptr(s),
        _ptr(a),
        _ptr(gm_c),
        _ptr(M),
        _ptr(share),
        _ptr(mrow),
        _ptr(gmean_p),
        _ptr(gmax_share),
        b,
        c,
        p,
        _ptr(out),
        _nt(),
    )
    return out
