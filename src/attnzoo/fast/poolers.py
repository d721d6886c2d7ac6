"""torchvision's multi-scale RoIAlign with its CPU inference spread over threads.

torchvision's CPU ``roi_align`` kernel runs on one thread whatever ``torch.get_num_threads()``
says, and in a two-stage detector it is the largest cost after the backbone (Cascade R-CNN
calls it once per stage). RoIs are independent, so :class:`FastMultiScaleRoIAlign` splits each
pyramid level's RoIs into one chunk per thread and runs torchvision's own kernel on the chunks
at once (the kernel releases the GIL); the output is bitwise the same as
:class:`torchvision.ops.MultiScaleRoIAlign`'s.

It runs so only when the :mod:`attnzoo.fast` switch is on, gradients are off (inference), the
features are CPU tensors, more than one thread is allowed, and nothing is being traced or
scripted; otherwise the torchvision forward runs.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align

from attnzoo.fast.switch import is_enabled

__all__ = ["FastMultiScaleRoIAlign"]

#: RoIs below which a level is pooled in one call (thread hand-off costs more than it saves)
_MIN_CHUNK = 16

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool, rebuilt when the thread count changes."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="attnzoo-roi-align"))
        return _pool[1]


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """:class:`torchvision.ops.MultiScaleRoIAlign` whose CPU inference runs torchvision's
    ``roi_align`` on chunks of RoIs in parallel threads (same parameters, same output)."""

    def _threads(self, features: list[Tensor]) -> int:
        """Worker count for this call, 0 to take torchvision's forward."""
        workers = torch.get_num_threads()
        if (
            workers < 2
            or not is_enabled()
            or torch.is_grad_enabled()
            or torch.jit.is_scripting()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or not features
            or any(f.device.type != "cpu" for f in features)
        ):
            return 0
        return workers

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]  # torchvision's order
        workers = self._threads(features)
        if workers == 0:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # torchvision's forward sets them
            super().forward(x, [b[:0] for b in boxes], image_shapes)
        assert self.scales is not None and self.map_levels is not None
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        levels = (
            self.map_levels(boxes)
            if len(features) > 1
            else rois.new_zeros(len(rois), dtype=torch.int64)
        )
        jobs = []  # (indices into rois, feature map, scale)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            pieces = min(workers, max(1, len(idx) // _MIN_CHUNK))
            jobs += [(chunk, feature, scale) for chunk in idx.tensor_split(pieces) if len(chunk)]
        channels = features[0].shape[1]
        result = features[0].new_empty((len(rois), channels, *self.output_size))
        if not jobs:
            return result

        def pool(job: tuple[Tensor, Tensor, float]) -> tuple[Tensor, Tensor]:
            idx, feature, scale = job
            with torch.no_grad():
                out = roi_align(
                    feature, rois[idx], self.output_size, scale, self.sampling_ratio, False
                )
            return idx, out

        for idx, out in _executor(workers).map(pool, jobs):
            result[idx] = out.to(result.dtype)
        return result
