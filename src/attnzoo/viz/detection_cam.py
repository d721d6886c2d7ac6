"""Class activation maps for detectors: YOLOv4-tiny with any attention neck.

Two methods through pytorch-grad-cam (PyPI ``grad-cam``):

* ``"eigencam"`` (default): Muhammad and Yeasin, "Eigen-CAM: Class Activation Map using Principal
  Components", IJCNN 2020; the first principal component of the target layers' activations. It
  needs no gradient and no target, which suits detectors (what grad-cam's own YOLO tutorials use).
* ``"gradcam"``: Selvaraju et al., "Grad-CAM", ICCV 2017, with the detections as the target: the
  score backpropagated for an image is ``sum_k obj_k * p_k[label_k]`` over its kept detections
  ``k`` (each matched to the anchor/cell candidate it came from, the decoded box of highest IoU
  with it), or the best candidate's ``obj * max_c p_c`` when no detections are given.

The default target layers are the last feature maps of the two heads, the 3x3 conv blocks whose
outputs the 1x1 prediction convs read (``head_p5[0]``, P5 at stride 32, and ``head_p4[0]``, P4 at
stride 16); grad-cam computes one map per layer, resizes each to the image, averages them and
min-max normalises the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from attnzoo.ops.validation import resolve_submodule
from attnzoo.viz.cam_methods import ModelState, method_class

if TYPE_CHECKING:
    from attnzoo.detection.yolov4_tiny import YoloV4Tiny

__all__ = ["DETECTOR_CAM_METHODS", "default_detector_target_layers", "detector_cam"]

_WHERE = "attnzoo.viz.detector_cam"

#: the methods :func:`detector_cam` accepts
DETECTOR_CAM_METHODS: tuple[str, ...] = ("eigencam", "gradcam")


def _check_model(model: Any) -> YoloV4Tiny:
    from attnzoo.detection.yolov4_tiny import YoloV4Tiny

    if not isinstance(model, YoloV4Tiny):
        raise TypeError(
            f"{_WHERE}: model must be an attnzoo.detection.YoloV4Tiny (the detector "
            f"whose outputs it decodes), got {type(model).__name__}; for "
            "classifiers use attnzoo.viz.cam"
        )
    return model


def default_detector_target_layers(model: nn.Module) -> list[nn.Module]:
    """``[model.head_p5[0], model.head_p4[0]]``: the features each head's 1x1 conv reads."""
    _check_model(model)
    return [model.get_submodule("head_p5.0"), model.get_submodule("head_p4.0")]


def _resolve_layers(model: nn.Module, layers: Any) -> list[nn.Module]:
    if layers is None:
        return default_detector_target_layers(model)
    if isinstance(layers, nn.Module | str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers:
        raise TypeError(
            f"{_WHERE}: target_layers must be None, a module, a dotted path or a "
            f"non-empty sequence of them; got {type(layers).__name__}"
        )
    out = []
    for layer in layers:
        if isinstance(layer, str):
            out.append(resolve_submodule(_WHERE, model, layer))
        elif isinstance(layer, nn.Module):
            if not any(m is layer for m in model.modules()):
                raise ValueError(
                    f"{_WHERE}: a target layer is a module that is not part of the model"
                )
            out.append(layer)
        else:
            raise TypeError(
                f"{_WHERE}: a target layer must be a module or a dotted path, got "
                f"{type(layer).__name__}"
            )
    return out


class DetectionScoreTarget:
    """grad-cam target for one image: ``sum_k obj * p[label_k]`` of the candidates that produced
    the detections ``boxes`` ``(M, 4)`` xyxy pixels / ``labels`` ``(M,)``.

    Called on the image's decoded candidates ``(N, 5 + nc)`` (``[x1, y1, x2, y2, obj, p...]``);
    each detection is matched to the candidate whose decoded box overlaps it most (IoU; the
    detections of ``postprocess`` are decoded candidates, clipped to the image). No detections:
    a zero score (and an all-zero map).
    """

    def __init__(self, boxes: Tensor, labels: Tensor) -> None:
        self.boxes = boxes
        self.labels = labels

    def __call__(self, output: Tensor) -> Tensor:
        from torchvision.ops import box_iou

        if self.boxes.numel() == 0:
            return output.sum() * 0.0
        with torch.no_grad():
            idx = box_iou(self.boxes.to(output), output[:, :4]).argmax(dim=1)
        labels = self.labels.to(output.device)
        return (output[idx, 4] * output[idx, 5 + labels]).sum()


def _top_candidate_score(output: Tensor) -> Tensor:
    """The best candidate's ``obj * max_c p_c`` (the image's top detection before NMS)."""
    return (output[:, 4] * output[:, 5:].amax(dim=1)).max()


class _Decoded(nn.Module):
    """The detector followed by decoding: ``(B, N, 5 + nc)`` candidates per image, so that
    grad-cam's per-image targets receive one image's candidates."""

    def __init__(self, model: nn.Module, anchors: Any, anchor_masks: Any) -> None:
        super().__init__()
        self.model = model
        self.anchors = anchors
        self.anchor_masks = anchor_masks

    def forward(self, x: Tensor) -> Tensor:
        from attnzoo.detection.decode import decode_outputs

        return decode_outputs(
            self.model(x),
            (x.shape[-2], x.shape[-1]),
            anchors=self.anchors,
            anchor_masks=self.anchor_masks,
        )


def _targets(predictions: Any, batch: int, num_classes: int) -> list[Callable[[Tensor], Tensor]]:
    if predictions is None:
        return [_top_candidate_score] * batch
    if not isinstance(predictions, Sequence) or len(predictions) != batch:
        raise ValueError(
            f"{_WHERE}: predictions must be a list of {batch} dicts (one per image) "
            f"with 'boxes' (M, 4) and 'labels' (M,); got {type(predictions).__name__}"
            + (f" of length {len(predictions)}" if isinstance(predictions, Sequence) else "")
        )
    out: list[Callable[[Tensor], Tensor]] = []
    for i, pred in enumerate(predictions):
        if not isinstance(pred, dict) or "boxes" not in pred or "labels" not in pred:
            raise ValueError(f"{_WHERE}: predictions[{i}] must be a dict with 'boxes' and 'labels'")
        boxes = torch.as_tensor(pred["boxes"], dtype=torch.float32)
        labels = torch.as_tensor(pred["labels"])
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"{_WHERE}: predictions[{i}] needs boxes (M, 4) and labels (M,), "
                f"got {tuple(boxes.shape)} and {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or (
            labels.numel() and not bool(((labels >= 0) & (labels < num_classes)).all())
        ):
            raise ValueError(
                f"{_WHERE}: predictions[{i}]['labels'] must be integers in [0, "
                f"{num_classes}), got {labels.tolist()}"
            )
        out.append(DetectionScoreTarget(boxes, labels.long()))
    return out


def detector_cam(
    model: nn.Module,
    images: Tensor,
    *,
    method: str = "eigencam",
    predictions: Sequence[dict[str, Tensor]] | None = None,
    target_layers: nn.Module | str | Sequence[nn.Module | str] | None = None,
    anchors: Any = None,
    anchor_masks: Any = None,
) -> Tensor:
    """Activation maps of a YOLOv4-tiny detector for ``images``, in ``[0, 1]`` at the input size.

    Args:
        model: an :class:`attnzoo.detection.YoloV4Tiny` (any attention, any class count).
        images: ``(B, 3, H, W)`` float images in ``[0, 1]``, ``H`` and ``W`` multiples of 32.
        method: ``"eigencam"`` (gradient-free, no target) or ``"gradcam"``.
        predictions: ``"gradcam"`` only: one dict per image with ``"boxes"`` ``(M, 4)`` xyxy
            input pixels and ``"labels"`` ``(M,)`` (e.g. :func:`attnzoo.detection.postprocess`'s
            output); the target is the summed ``obj * p_label`` of these detections. ``None``:
            each image's best candidate (``obj * max_c p_c``).
        target_layers: modules of ``model`` or dotted paths (``"conv_for_p5"``,
            ``"feat1_att"``); default :func:`default_detector_target_layers`.
        anchors, anchor_masks: for decoding (``"gradcam"``); default
            :data:`attnzoo.detection.ANCHORS` / ``ANCHOR_MASKS``.

    Returns:
        ``(B, H, W)`` float32 CPU tensor in ``[0, 1]`` (each map min-max normalised by
        grad-cam; an image whose target is zero gets an all-zero map).

    Side effects: none that outlive the call: the training flags, ``requires_grad`` and ``.grad``
    of the model are restored and grad-cam's hooks removed, also on error. Parameters are
    frozen during the call; the gradient flows from a detached copy of ``images``.

    Raises:
        TypeError: ``model`` is not a ``YoloV4Tiny``; bad ``target_layers``.
        ValueError: unknown method, bad images or predictions, predictions with ``"eigencam"``.
        ImportError: ``grad-cam`` is not installed (``pip install "attnzoo[viz]"``).
    """
    from attnzoo.detection.yolov4_tiny import ANCHOR_MASKS, ANCHORS

    detector = _check_model(model)
    if not isinstance(method, str) or method.lower() not in DETECTOR_CAM_METHODS:
        raise ValueError(f"{_WHERE}: method must be one of {DETECTOR_CAM_METHODS}, got {method!r}")
    method = method.lower()
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{_WHERE}: images must be a (B, 3, H, W) tensor; got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images)}"
        )
    if method == "eigencam" and predictions is not None:
        raise ValueError(
            f"{_WHERE}: EigenCAM uses no target, so predictions= has no effect; "
            "pass method='gradcam' to explain given detections"
        )
    cam_class = method_class(method)
    layers = _resolve_layers(model, target_layers)
    targets = _targets(predictions, images.shape[0], detector.num_classes)
    wrapped = _Decoded(
        model,
        ANCHORS if anchors is None else anchors,
        ANCHOR_MASKS if anchor_masks is None else anchor_masks,
    )
    state = ModelState(model)
    device = next(iter(model.parameters()), images).device
    x = images.detach().to(device).clone().requires_grad_(True)
    try:
        for p, _, _ in state.params:
            p.requires_grad_(False)
        with torch.enable_grad(), cam_class(model=wrapped, target_layers=layers) as explainer:
            try:
                maps = explainer(input_tensor=x, targets=targets)
            except IndexError as err:  # grad-cam's __exit__ would swallow it
                raise RuntimeError(f"{_WHERE}: {method} failed: {err!r}") from err
    finally:
        state.restore()
    out = torch.from_numpy(maps).float()
    if out.shape != (images.shape[0], *images.shape[-2:]):
        raise RuntimeError(
            f"{_WHERE}: grad-cam returned shape {tuple(out.shape)} for images {tuple(images.shape)}"
        )
    return out.clamp_(0.0, 1.0)
