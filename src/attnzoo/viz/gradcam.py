"""Class activation maps through the ``grad-cam`` package (pytorch-grad-cam).

Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization", ICCV 2017, and the methods that followed it
(Grad-CAM++ WACV 2018, Score-CAM CVPRW 2020, Eigen-CAM IJCNN 2020, LayerCAM TIP 2021, XGrad-CAM
BMVC 2020, HiResCAM arXiv 2020, Ablation-CAM WACV 2020). The maps themselves are computed by
``pytorch_grad_cam`` (PyPI ``grad-cam``, tested with 1.5.7); this module picks the target layer
for the project's networks, translates class indices to grad-cam targets and leaves the model
exactly as it found it.

``grad-cam`` is an optional dependency (``pip install "attnzoo[viz]"``): it is imported inside
:func:`cam` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnzoo.ops.validation import resolve_submodule
from attnzoo.viz.cam_methods import CAM_METHODS, ModelState, method_class
from attnzoo.viz.detection_cam import detector_cam

__all__ = ["CAM_METHODS", "cam", "default_target_layer"]

LayerSpec = str | nn.Module


def _qualname(model: nn.Module) -> tuple[str, str]:
    cls = type(model)
    return cls.__module__, cls.__qualname__


def default_target_layer(model: nn.Module) -> nn.Module:
    """The last stage of the project's networks: the usual Grad-CAM layer.

    ================================================  ============================
    model                                             target layer
    ================================================  ============================
    ``attnzoo.models.SmallResNet``                    last ``layerN`` (``layer3`` of
    (``cifar_resnet8``)                               ``cifar_resnet8``)
    torchvision ``ResNet`` (all ``attnzoo.models``    ``layer4``
    ResNet/ResNeXt/Wide/CIFAR/SKNet builders)
    timm ``ResNet`` (``timm.create_model("resnet*")``)  ``layer4``
    torchvision ``MobileNetV2`` (``mobilenet_v2``)    ``features[-1]`` (last 1x1 conv + BN +
                                                      ReLU6, 1280 channels)
    ================================================  ============================

    Attached attention modules do not change the answer (they live inside the blocks).

    Raises:
        ValueError: any other model; pass ``target_layer=`` (a module or a dotted path such as
            ``"backbone.conv"``) to :func:`cam`.
    """
    from torchvision.models import MobileNetV2, ResNet

    from attnzoo.models.small import SmallResNet

    if isinstance(model, SmallResNet):
        return getattr(model, f"layer{model.num_stages}")
    if isinstance(model, ResNet) or _qualname(model) == ("timm.models.resnet", "ResNet"):
        return cast(nn.Module, model.layer4)
    if isinstance(model, MobileNetV2):
        return model.features[-1]
    raise ValueError(
        f"attnzoo.viz.cam: no default target layer for {type(model).__name__} (known: "
        "SmallResNet/cifar_resnet8, torchvision and timm ResNets, torchvision MobileNetV2); "
        'pass target_layer= as a module or a dotted path, e.g. target_layer="layer3"'
    )


def _resolve_layer(model: nn.Module, layer: LayerSpec | None) -> nn.Module:
    if layer is None:
        return default_target_layer(model)
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(
                "attnzoo.viz.cam: target_layer is a module that is not part of the model"
            )
        return layer
    if isinstance(layer, str):
        return resolve_submodule("attnzoo.viz.cam", model, layer)
    raise TypeError(
        "attnzoo.viz.cam: target_layer must be None, an nn.Module or a dotted path "
        f"string; got {type(layer).__name__}"
    )


def _targets(targets: Any, batch: int) -> list[Callable[[Tensor], Tensor]] | None:
    """``None`` (predicted class) or one grad-cam target per image."""
    if targets is None:
        return None
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if isinstance(targets, Tensor):
        if targets.dim() > 1 or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                "attnzoo.viz.cam: targets must be an integer tensor of shape (B,) "
                f"or (); got dtype {targets.dtype}, shape {tuple(targets.shape)}"
            )
        targets = targets.tolist()
    if isinstance(targets, int) and not isinstance(targets, bool):
        targets = [targets] * batch
    if not isinstance(targets, Sequence) or isinstance(targets, str):
        raise TypeError(
            "attnzoo.viz.cam: targets must be None, a class index, a sequence of "
            f"class indices or grad-cam target callables; got {type(targets).__name__}"
        )
    targets = list(targets)
    if len(targets) != batch:
        raise ValueError(
            f"attnzoo.viz.cam: targets has {len(targets)} entries for a batch of {batch} images"
        )
    out = []
    for t in targets:
        if isinstance(t, bool):
            raise TypeError(f"attnzoo.viz.cam: a target must be a class index, got {t!r}")
        if isinstance(t, int):
            if t < 0:
                raise ValueError(f"attnzoo.viz.cam: targets must be class indices >= 0, got {t}")
            out.append(ClassifierOutputTarget(t))
        elif callable(t):
            out.append(t)
        else:
            raise TypeError(
                f"attnzoo.viz.cam: a target must be a class index or a callable, "
                f"got {type(t).__name__}"
            )
    return out


def cam(
    model: nn.Module,
    images: Tensor,
    method: str = "gradcam",
    target_layer: LayerSpec | None = None,
    targets: Tensor | int | Sequence[int | Callable[[Tensor], Tensor]] | None = None,
) -> Tensor:
    """Class activation maps of ``images`` for a classifier, in ``[0, 1]`` at the image size.

    Args:
        model: a classifier returning logits ``(B, num_classes)``.
        images: ``(B, C, H, W)`` network inputs (normalised as the network expects).
        method: one of :data:`CAM_METHODS` (case-insensitive): ``"gradcam"``, ``"gradcam++"``,
            ``"hirescam"``, ``"xgradcam"``, ``"layercam"``, ``"eigencam"``, ``"eigengradcam"``,
            ``"gradcamelementwise"``, ``"scorecam"``, ``"ablationcam"``.
        target_layer: the layer whose activations (and gradients) are used: a module of
            ``model``, or a dotted path (``"layer3"``, ``"features.18"``); default
            :func:`default_target_layer` (the last stage).
        targets: ``None``: each image's predicted (arg-max) class; an int: that class for every
            image; a sequence or ``(B,)`` integer tensor of class indices: one per image (grad-cam
            target callables are accepted too).

    Returns:
        ``(B, H, W)`` float32 CPU tensor. grad-cam min-max normalises each map (after the ReLU)
        and resizes it to ``(H, W)`` with OpenCV's bilinear resize (half-pixel centres, like
        :func:`attnzoo.viz.upsample_map`), so the values lie in ``[0, 1]``; a map that is zero
        everywhere stays zero.

    Side effects: none that outlive the call. grad-cam puts the model in eval mode, zeroes the
    parameters' gradients and hooks the target layer; the training flag of every submodule,
    every parameter's ``requires_grad`` and ``.grad`` are restored and the hooks removed (grad-cam's
    context manager), also on error. During the call the parameters are frozen and the gradient
    flows from a detached copy of ``images`` that requires grad, so no parameter gradient is
    computed or accumulated.

    Raises:
        ImportError: ``grad-cam`` is not installed (``pip install "attnzoo[viz]"``).
        ValueError: unknown method, no default target layer for this model, bad targets.
    """
    if _qualname(model) == ("attnzoo.detection.yolov4_tiny", "YoloV4Tiny"):
        if targets is not None or target_layer is not None:
            raise ValueError(
                "attnzoo.viz.cam: for a YoloV4Tiny give no targets/target_layer here; call "
                "attnzoo.viz.detector_cam(model, images, predictions=..., target_layers=...)"
            )
        return detector_cam(model, images, method=method)
    cam_class = method_class(method)
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            "attnzoo.viz.cam: images must be a (B, C, H, W) tensor; got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images)}"
        )
    layers = [_resolve_layer(model, target_layer)]
    grad_targets = _targets(targets, images.shape[0])
    state = ModelState(model)
    device = next(iter(model.parameters()), images).device
    x = images.detach().to(device).clone().requires_grad_(True)
    try:
        for p, _, _ in state.params:
            p.requires_grad_(False)
        with torch.enable_grad(), cam_class(model=model, target_layers=layers) as explainer:
            try:
                maps = explainer(input_tensor=x, targets=grad_targets)
            except IndexError as err:
                # grad-cam's __exit__ swallows IndexError (and prints it); keep it an error
                raise RuntimeError(f"attnzoo.viz.cam: {method} failed: {err!r}") from err
    finally:
        state.restore()
    out = torch.from_numpy(maps).float()
    if out.shape != (images.shape[0], *images.shape[-2:]):  # a grad-cam contract we rely on
        raise RuntimeError(
            f"attnzoo.viz.cam: grad-cam returned shape {tuple(out.shape)} for "
            f"images {tuple(images.shape)}"
        )
    return out.clamp_(0.0, 1.0)
