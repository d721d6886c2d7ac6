"""The CAM methods of pytorch-grad-cam by name, and the model state a CAM call restores.

Shared by :func:`attnzoo.viz.cam` (classifiers) and :func:`attnzoo.viz.detector_cam`.
"""

from __future__ import annotations

from torch import nn

__all__ = ["CAM_METHODS", "ModelState", "method_class"]

#: method name (lower case) -> ``pytorch_grad_cam`` class name. FullGrad is left out: it ignores
#: the target layer and uses every biased layer instead.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
_ALIASES = {
    "gradcamplusplus": "gradcam++",
    "grad-cam": "gradcam",
    "grad-cam++": "gradcam++",
    "score-cam": "scorecam",
    "eigen-cam": "eigencam",
    "xgrad-cam": "xgradcam",
    "ablation-cam": "ablationcam",
}


def method_class(method: str) -> type:
    if not isinstance(method, str):
        raise TypeError(f"attnzoo.viz.cam: method must be a string, got {type(method).__name__}")
    key = method.lower()
    key = _ALIASES.get(key, key)
    if key not in CAM_METHODS:
        raise ValueError(
            f"attnzoo.viz.cam: unknown method {method!r}; choose one of "
            f"{', '.join(CAM_METHODS)} (case-insensitive)"
        )
    try:
        import pytorch_grad_cam
    except ImportError as err:
        raise ImportError(
            'attnzoo.viz.cam needs the grad-cam package: pip install "attnzoo[viz]"'
        ) from err
    return getattr(pytorch_grad_cam, CAM_METHODS[key])


class ModelState:
    """Training flags of every submodule, ``requires_grad`` and ``.grad`` of every parameter."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training
        for p, requires_grad, grad in self.params:
            p.requires_grad_(requires_grad)
            p.grad = grad
