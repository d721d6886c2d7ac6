"""Faster R-CNN and Cascade R-CNN on torchvision's detection stack, with an attention backbone.

* :func:`faster_rcnn_resnet50_fpn` / :func:`cascade_rcnn_resnet50_fpn`: torchvision's
  ``FasterRCNN`` on :func:`attnzoo.models.resnet50` (``attention=`` as every attnzoo builder)
  through torchvision's ResNet-FPN extractor, as ``fasterrcnn_resnet50_fpn`` builds it (frozen
  BatchNorm and 3 trainable stages when backbone weights are given, plain BatchNorm and every stage
  trainable otherwise). The cascade replaces the RoI heads by
  :class:`attnzoo.detection.cascade.CascadeRoIHeads` (Cai & Vasconcelos, "Cascade R-CNN: Delving
  into High Quality Object Detection", CVPR 2018): 3 stages at IoU 0.5 / 0.6 / 0.7, each a
  ``TwoMLPHead`` (1024-d) and a class-agnostic box regressor.
* :func:`faster_rcnn_small` / :func:`cascade_rcnn_small`: CPU-sized variants for 64–128 px images
  (tests, the bench's demo): a ResNet-18-style trunk of one ``BasicBlock`` per stage
  (:class:`attnzoo.models.SmallResNet`, widths 32/64/128/256), a 64-channel FPN on strides
  4/8/16 (+ max-pool level 32), anchors 8–64 px, 128 RPN proposals in training (64 at test),
  64 sampled RoIs per image, 256-d box heads; images are used at their own size (no resize).

``num_classes`` counts the background, as torchvision's (``1 + object classes``; labels of the
targets start at 1). Keyword arguments are split by name: ``FasterRCNN``'s (``min_size``,
``rpn_post_nms_top_n_train``, ``box_score_thresh`` ...), then for the cascade
``CascadeRoIHeads``' (``stage_iou_thresholds``, ``convention``, ``mode`` ...), and the rest go to
the attention module (``reduction=8``). Backbone weights are only ever read from a local state dict
or file (``weights_backbone``), never downloaded.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from attnzoo import fast

__all__ = [
    "RCNN_BUILDERS",
    "KeepSizeTransform",
    "cascade_rcnn_resnet50_fpn",
    "cascade_rcnn_small",
    "faster_rcnn_resnet50_fpn",
    "faster_rcnn_small",
    "split_rcnn_kwargs",
]

_FASTER_KEYS = frozenset(inspect.signature(FasterRCNN.__init__).parameters) - {
    "self",
    "backbone",
    "num_classes",
    "kwargs",
}
#: FasterRCNN keywords that become CascadeRoIHeads keywords in the cascade
_TO_CASCADE = {
    "box_score_thresh": "score_thresh",
    "box_nms_thresh": "nms_thresh",
    "box_detections_per_img": "detections_per_img",
    "box_batch_size_per_image": "batch_size_per_image",
    "box_positive_fraction": "positive_fraction",
}
#: the small variants' RPN / RoI settings (FasterRCNN keywords)
SMALL_RCNN: dict[str, Any] = {
    "rpn_pre_nms_top_n_train": 512,
    "rpn_post_nms_top_n_train": 128,
    "rpn_pre_nms_top_n_test": 256,
    "rpn_post_nms_top_n_test": 64,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 50,
}
SMALL_WIDTHS = (32, 64, 128, 256)
SMALL_FPN, SMALL_REPRESENTATION = 64, 256
SMALL_ANCHORS = ((8,), (16,), (32,), (64,))


def _cascade_keys() -> frozenset[str]:
    from attnzoo.detection.cascade import CascadeRoIHeads

    params = inspect.signature(CascadeRoIHeads.__init__).parameters
    return frozenset(params) - {"self", "box_roi_pool", "box_heads", "box_predictors"}


def split_rcnn_kwargs(
    kwargs: Mapping[str, Any], *, cascade: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(faster_rcnn_kwargs, cascade_kwargs, attention_kwargs)`` of a builder's ``**kwargs``,
    split by name (``cascade_kwargs`` is empty unless ``cascade``)."""
    casc_keys = _cascade_keys() if cascade else frozenset()
    faster = {k: v for k, v in kwargs.items() if k in _FASTER_KEYS}
    casc = {k: v for k, v in kwargs.items() if k in casc_keys and k not in faster}
    rest = {k: v for k, v in kwargs.items() if k not in faster and k not in casc}
    return faster, casc, rest


class KeepSizeTransform(GeneralizedRCNNTransform):
    """torchvision's R-CNN transform without the resize: images keep their size (normalised and
    padded to a multiple of ``size_divisible`` only), so boxes need no rescaling."""

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def _check_num_classes(name: str, num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"{name}: num_classes counts the background as torchvision's does (1 + object "
            f"classes), so it must be an integer >= 2; got {num_classes!r}"
        )
    return num_classes


def _keep_attention_trainable(backbone: nn.Module) -> None:
    """Attention modules are new (never in backbone weights): train them even in frozen stages."""
    from attnzoo.models import attached

    for a in attached(backbone):
        for p in backbone.get_submodule(a.path).parameters():
            p.requires_grad_(True)


def _resnet50_fpn(
    attention: Any,
    weights_backbone: Mapping[str, torch.Tensor] | str | os.PathLike | None,
    trainable_backbone_layers: int | None,
    attention_kwargs: Mapping[str, Any],
    name: str,
) -> BackboneWithFPN:
    from attnzoo.models import resnet50

    local = (Mapping, str, os.PathLike)
    if weights_backbone is not None and not isinstance(weights_backbone, local):
        raise TypeError(
            f"{name}: weights_backbone must be a state dict or a local file path (nothing is "
            f"downloaded); got {type(weights_backbone).__name__}"
        )
    trained = weights_backbone is not None
    layers = trainable_backbone_layers
    if layers is None:
        layers = 3 if trained else 5
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= 5:
        raise ValueError(f"{name}: trainable_backbone_layers must be in [0, 5]; got {layers!r}")
    norm = FrozenBatchNorm2d if trained else nn.BatchNorm2d
    state = None
    if trained:
        state = (
            weights_backbone
            if isinstance(weights_backbone, Mapping)
            else torch.load(str(weights_backbone), map_location="cpu", weights_only=True)
        )
        # FrozenBatchNorm2d has no step counter
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    trunk = resnet50(
        attention,
        weights=state,
        model_kwargs={"norm_layer": norm},
        **dict(attention_kwargs),
    )
    backbone = _resnet_fpn_extractor(trunk, layers)
    _keep_attention_trainable(backbone)
    return backbone


def _small_fpn(attention: Any, attention_kwargs: Mapping[str, Any]) -> BackboneWithFPN:
    from attnzoo.models import cifar_resnet8

    trunk = cifar_resnet8(
        attention,
        model_kwargs={"widths": SMALL_WIDTHS, "blocks": (1, 1, 1, 1), "strides": (2, 2, 2, 2)},
        **dict(attention_kwargs),
    )
    return BackboneWithFPN(
        trunk,
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        list(SMALL_WIDTHS[1:]),
        SMALL_FPN,
    )


def _cascade_heads(model: FasterRCNN, num_classes: int, representation: int, **kw: Any) -> None:
    """Replace ``model.roi_heads`` by a 3-stage :class:`CascadeRoIHeads` on the same RoI pool."""
    from attnzoo.detection.cascade import CascadeRoIHeads, cascade_box_heads

    old = model.roi_heads
    pool = old.box_roi_pool
    resolution = int(pool.output_size[0])
    channels = model.backbone.out_channels
    mode = kw.get("mode", "cascade")
    stages = len(kw.get("stage_iou_thresholds") or (0.5, 0.6, 0.7))
    heads, predictors = cascade_box_heads(
        channels,
        resolution,
        representation,
        num_classes,
        num_stages=stages,
        class_agnostic=kw.get("class_agnostic", True),
    )
    if mode != "cascade":  # the paper's ablations: one head (and one predictor if iterative)
        heads = heads[:1]
        predictors = predictors[:1] if mode == "iterative" else predictors
    defaults = {
        "score_thresh": old.score_thresh,
        "nms_thresh": old.nms_thresh,
        "detections_per_img": old.detections_per_img,
        "batch_size_per_image": old.fg_bg_sampler.batch_size_per_image,
        "positive_fraction": old.fg_bg_sampler.positive_fraction,
    }
    model.roi_heads = CascadeRoIHeads(pool, heads, predictors, **{**defaults, **kw})


def _detector(
    backbone: BackboneWithFPN,
    num_classes: int,
    *,
    cascade: bool,
    faster_kwargs: dict[str, Any],
    cascade_kwargs: dict[str, Any],
    representation: int,
    keep_size: bool,
    anchor_generator: AnchorGenerator | None = None,
) -> FasterRCNN:
    for k in list(faster_kwargs):
        if cascade and k in _TO_CASCADE:
            cascade_kwargs.setdefault(_TO_CASCADE[k], faster_kwargs[k])
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation)
    predictor = FastRCNNPredictor(representation, num_classes)
    model = FasterRCNN(
        backbone,
        None,
        rpn_anchor_generator=anchor_generator,
        box_head=box_head,
        box_predictor=predictor,
        **faster_kwargs,
    )
    if keep_size:
        t = model.transform
        model.transform = KeepSizeTransform(
            t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible
        )
    if cascade:
        _cascade_heads(model, num_classes, representation, **cascade_kwargs)
    if fast.is_enabled():
        fast.accelerate(model)  # the RoI pooler's CPU inference on all threads
    model.num_classes = num_classes
    return model


def _split(name: str, kwargs: Mapping[str, Any], cascade: bool) -> tuple[dict, dict, dict]:
    faster, casc, rest = split_rcnn_kwargs(kwargs, cascade=cascade)
    if not cascade:
        stray = sorted(set(rest) & _cascade_keys())
        if stray:
            raise ValueError(
                f"{name}: {', '.join(stray)} are Cascade R-CNN options; use the cascade builder"
            )
    return faster, casc, rest


def _check_attention_kwargs(name: str, attention: Any, rest: Mapping[str, Any]) -> None:
    if attention is None and rest:
        raise ValueError(
            f"{name}: unknown keyword argument(s) {', '.join(sorted(rest))} (not FasterRCNN, "
            "CascadeRoIHeads or attention options; attention options need attention=)"
        )


def _rcnn_resnet50_fpn(
    name: str,
    num_classes: int,
    attention: Any,
    weights_backbone: Mapping[str, torch.Tensor] | str | os.PathLike | None,
    trainable_backbone_layers: int | None,
    keep_size: bool,
    kwargs: dict[str, Any],
    *,
    cascade: bool,
) -> FasterRCNN:
    """The two ResNet-50-FPN builders: checks, backbone, then Faster or Cascade R-CNN."""
    _check_num_classes(name, num_classes)
    faster, casc, rest = _split(name, kwargs, cascade=cascade)
    _check_attention_kwargs(name, attention, rest)
    backbone = _resnet50_fpn(attention, weights_backbone, trainable_backbone_layers, rest, name)
    return _detector(
        backbone,
        num_classes,
        cascade=cascade,
        faster_kwargs=faster,
        cascade_kwargs=casc,
        representation=1024,
        keep_size=keep_size,
    )


def faster_rcnn_resnet50_fpn(
    num_classes: int = 91,
    attention: Any = None,
    *,
    weights_backbone: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    trainable_backbone_layers: int | None = None,
    keep_size: bool = False,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN ResNet-50-FPN (torchvision's ``fasterrcnn_resnet50_fpn`` layout) on
    :func:`attnzoo.models.resnet50` with ``attention`` in every bottleneck.

    Args:
        num_classes: 1 + object classes (torchvision's convention).
        attention: registry name, class or factory; ``None`` for the plain backbone.
        weights_backbone: ImageNet weights of the plain or attached ResNet-50: a state dict or a
            local file (loaded with :func:`attnzoo.load_pretrained`; attention keys may be
            missing). With weights, BatchNorm is frozen and ``trainable_backbone_layers``
            defaults to 3, as torchvision does; without, BatchNorm trains and all 5 do.
        trainable_backbone_layers: ResNet stages (from the last) left trainable, 0–5; attention
            modules always train.
        keep_size: use images at their own size (:class:`KeepSizeTransform`) instead of
            torchvision's resize to ``min_size``/``max_size``.
        **kwargs: ``FasterRCNN`` keywords, then the attention module's keywords.
    """
    return _rcnn_resnet50_fpn(
        "faster_rcnn_resnet50_fpn",
        num_classes,
        attention,
        weights_backbone,
        trainable_backbone_layers,
        keep_size,
        kwargs,
        cascade=False,
    )


def cascade_rcnn_resnet50_fpn(
    num_classes: int = 91,
    attention: Any = None,
    *,
    weights_backbone: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    trainable_backbone_layers: int | None = None,
    keep_size: bool = False,
    **kwargs: Any,
) -> FasterRCNN:
    """Cascade R-CNN ResNet-50-FPN: :func:`faster_rcnn_resnet50_fpn` with
    :class:`~attnzoo.detection.cascade.CascadeRoIHeads` (3 stages, 1024-d ``TwoMLPHead`` each,
    class-agnostic regression, mmdetection's settings by default). ``CascadeRoIHeads`` keywords
    (``stage_iou_thresholds``, ``convention``, ``mode``, ``score_average`` ...) are accepted in
    ``kwargs``; other arguments as :func:`faster_rcnn_resnet50_fpn`."""
    return _rcnn_resnet50_fpn(
        "cascade_rcnn_resnet50_fpn",
        num_classes,
        attention,
        weights_backbone,
        trainable_backbone_layers,
        keep_size,
        kwargs,
        cascade=True,
    )


def _small(name: str, num_classes: int, attention: Any, kwargs: Mapping[str, Any], cascade: bool):
    _check_num_classes(name, num_classes)
    keep_size = kwargs.get("keep_size", True)
    kwargs = {k: v for k, v in kwargs.items() if k != "keep_size"}
    faster, casc, rest = _split(name, {**SMALL_RCNN, **kwargs}, cascade)
    _check_attention_kwargs(name, attention, rest)
    backbone = _small_fpn(attention, rest)
    anchors = AnchorGenerator(SMALL_ANCHORS, ((0.5, 1.0, 2.0),) * len(SMALL_ANCHORS))
    faster.setdefault("min_size", 64)
    faster.setdefault("max_size", 128)
    return _detector(
        backbone,
        num_classes,
        cascade=cascade,
        faster_kwargs=faster,
        cascade_kwargs=casc,
        representation=SMALL_REPRESENTATION,
        keep_size=keep_size,
        anchor_generator=anchors,
    )


def faster_rcnn_small(num_classes: int = 2, attention: Any = None, **kwargs: Any) -> FasterRCNN:
    """A CPU-sized Faster R-CNN for 64–128 px images (see the module docstring): attention in
    every ``BasicBlock`` of the trunk; ``keep_size=True`` by default (images are not resized).
    Keywords as :func:`faster_rcnn_resnet50_fpn` (``FasterRCNN``'s, then the attention's)."""
    return _small("faster_rcnn_small", num_classes, attention, kwargs, cascade=False)


def cascade_rcnn_small(num_classes: int = 2, attention: Any = None, **kwargs: Any) -> FasterRCNN:
    """:func:`faster_rcnn_small` with 3-stage :class:`~attnzoo.detection.cascade.CascadeRoIHeads`
    (256-d heads, class-agnostic regression); ``CascadeRoIHeads`` keywords are accepted."""
    return _small("cascade_rcnn_small", num_classes, attention, kwargs, cascade=True)


#: name -> builder, for ``attnzoo bench --task detect --model NAME``
RCNN_BUILDERS = {
    f.__name__: f
    for f in (
        faster_rcnn_small,
        cascade_rcnn_small,
        faster_rcnn_resnet50_fpn,
        cascade_rcnn_resnet50_fpn,
    )
}
