"""attnzoo attention modules in Ultralytics YOLO models, without editing Ultralytics.

Needs the optional extra ``pip install 'attnzoo[ultralytics]'`` (Ultralytics is AGPL-3.0; this
module only calls its public entry points: the model-YAML name lookup of ``ultralytics.nn.tasks``,
``DetectionModel``, ``DetectionTrainer`` and ``YOLO``; it copies none of its code). Ultralytics is
imported inside the functions that need it, so importing this module does not import it.

Two ways in:

1. **In the model YAML.** :func:`register` makes ``AttnZoo`` a layer name of Ultralytics model
   YAMLs; a row ``[-1, 1, AttnZoo, ["cbam", {"reduction": 8}]]`` inserts any registry module with
   its keyword arguments. Its channel count is the output width of the layer it follows, read at
   the stride-probe forward that ``DetectionModel`` runs while it is built, so one YAML serves
   every width scale (n, s, m, l, x).
2. **On an existing model and its pretrained weights.** :func:`attach_to_yolo` inserts modules
   after chosen layers with :func:`attnzoo.attach` (no layer index changes, every original
   ``state_dict`` key unchanged, optionally identity-initialised), :func:`load_yolo_weights` loads
   a plain checkpoint into it and returns the new keys, and :func:`attention_trainer` returns a
   ``DetectionTrainer`` that does both whenever Ultralytics rebuilds the model for training.

Offline use: :func:`setup_offline` sets ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR`` and places a
local font there (Ultralytics otherwise fetches ``Arial.ttf`` when it checks a dataset). Call it
before the first ``import ultralytics``. :func:`write_yolo_dataset` writes
:class:`attnzoo.datasets.DetectionData` (e.g. the built-in digit scenes) in the YOLO txt layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnzoo.datasets.data import DetectionData, check_image_format, check_writable, save_image
from attnzoo.models.attach import attach, attached, load_pretrained
from attnzoo.registry import create, info

__all__ = [
    "AttnZoo",
    "AttnZooDetectionTrainer",  # noqa: F822  (module __getattr__: made on first use)
    "UltralyticsDetector",
    "YOLO_MODELS",
    "attach_to_yolo",
    "attention_trainer",
    "load_yolo_weights",
    "register",
    "setup_offline",
    "write_yolo_dataset",
    "yolo_detector",
]

_INSTALL = "pip install 'attnzoo[ultralytics]'"


def _ultralytics() -> Any:
    """The ``ultralytics`` package, or ImportError saying how to install it."""
    try:
        import ultralytics
    except ImportError as err:
        raise ImportError(
            f"attnzoo.integrations.ultralytics needs the ultralytics package: {_INSTALL}"
        ) from err
    return ultralytics


# ---------------------------------------------------------------------------------------------
# 1. the model-YAML layer
class AttnZoo(nn.Module):
    """An attnzoo attention module as a layer of an Ultralytics model YAML.

    YAML row: ``[-1, 1, AttnZoo, ["cbam", {"reduction": 8}]]`` (or ``[-1, 1, AttnZoo, [eca]]``).
    Ultralytics passes the row's arguments verbatim and sets the row's output width to its input
    width, which is right: attention keeps the shape.

    The module is built at the first forward from the input's channel count (``DetectionModel``
    runs such a forward, in eval mode, while it is constructed, before any optimiser exists), so
    the same YAML works at every width scale. The attention is the child ``attn``; its keys are
    ``model.<i>.attn.*``. A first forward in training mode raises ``RuntimeError`` (parameters
    created then would be missing from an optimiser built before): run one forward in eval mode
    first, or pass ``channels``.

    Args:
        attention: a registry name (``attnzoo.available()``).
        kwargs: the module's keyword arguments, including ``preset``.
        channels: build at once for this many channels instead of at the first forward.
    """

    def __init__(
        self,
        attention: str,
        kwargs: Mapping[str, Any] | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(attention, str):
            raise TypeError(
                "AttnZoo: the first YAML argument must be an attention name such as 'cbam', got "
                f"{attention!r}"
            )
        meta = info(attention)  # unknown names: ValueError listing the available ones
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(
                "AttnZoo: the second YAML argument must be a mapping of keyword arguments such as "
                f"{{reduction: 8}}, got {kwargs!r}"
            )
        unknown = sorted(set(kwargs) - set(meta.defaults) - {"preset"})
        if unknown:
            raise TypeError(
                f"AttnZoo: {meta.name} takes no keyword argument {', '.join(unknown)}; it takes "
                f"{', '.join([*meta.defaults, 'preset'])}"
            )
        meta.resolve_kwargs({}, kwargs.get("preset"))  # an unknown preset fails here
        self.attention = meta.name
        self.kwargs = dict(kwargs)
        self.register_module("attn", None)
        if channels is not None:
            self.attn = self._build(channels)

    def _build(self, channels: int) -> nn.Module:
        try:
            return create(self.attention, channels, **self.kwargs)
        except (ValueError, TypeError) as err:
            raise type(err)(
                f"AttnZoo: cannot build {self.attention!r} for {channels} channels (the output "
                f"width of the layer before this row): {err}"
            ) from err

    def forward(self, x: Tensor) -> Tensor:
        if self.attn is None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    f"AttnZoo({self.attention!r}): first forward in training mode; its parameters "
                    "would be created after the optimiser. Ultralytics' detection models build "
                    "it in their stride-probe forward; for other models run one forward in eval "
                    "mode before training, or pass channels="
                )
            if x.dim() < 3:
                raise ValueError(
                    f"AttnZoo({self.attention!r}): expected a (B, C, H, W) input, got shape "
                    f"{tuple(x.shape)}"
                )
            module = self._build(int(x.shape[1])).to(device=x.device, dtype=x.dtype)
            self.attn = module.train(self.training)
        return self.attn(x)

    def extra_repr(self) -> str:
        pending = ", built at the first forward" if self.attn is None else ""
        return f"attention={self.attention!r}, kwargs={self.kwargs}{pending}"


def register(name: str = "AttnZoo") -> type[AttnZoo]:
    """Make ``name`` resolve to :class:`AttnZoo` in Ultralytics model YAMLs; idempotent.

    Ultralytics looks a YAML layer name up as ``nn.<X>``, ``torchvision.ops.<X>`` or a name of
    the ``ultralytics.nn.tasks`` module; this adds ``name`` there. Call it once per process before
    building or training a model from such a YAML (loading a trained checkpoint needs only
    attnzoo installed).

    Raises:
        ValueError: ``name`` is not an identifier, or already names another Ultralytics layer.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"attnzoo.integrations.ultralytics.register: name must be a Python identifier such "
            f"as 'AttnZoo', got {name!r}"
        )
    _ultralytics()
    from ultralytics.nn import tasks

    current = vars(tasks).get(name)
    if current is AttnZoo:
        return AttnZoo
    if current is not None:
        raise ValueError(
            f"attnzoo.integrations.ultralytics.register: {name!r} already names {current!r} in "
            "ultralytics.nn.tasks; choose another name"
        )
    setattr(tasks, name, AttnZoo)
    return AttnZoo


# ---------------------------------------------------------------------------------------------
# 2. attach to an existing model, load its plain weights, train
def _detection_model(model: nn.Module, who: str) -> nn.Module:
    """The ``BaseModel`` (``DetectionModel``...) of a ``YOLO`` object, or ``model`` itself."""
    _ultralytics()
    from ultralytics.engine.model import Model
    from ultralytics.nn.tasks import BaseModel

    net = model.model if isinstance(model, Model) else model
    if not isinstance(net, BaseModel):
        raise TypeError(
            f"{who}: model must be an Ultralytics YOLO object or model (DetectionModel...), got "
            f"{type(net).__name__}"
        )
    return net


def _layer_paths(net: nn.Module, at: Iterable[int | str] | int | str, who: str) -> list[str]:
    layers: Any = net.model  # the nn.Sequential of the YAML rows
    items = [at] if isinstance(at, (int, str)) else list(at)
    if not items:
        raise ValueError(f"{who}: at= is empty; give layer indices such as [6, 8, 9]")
    paths = []
    for item in items:
        if isinstance(item, str) and item.startswith("model."):
            item = item[len("model.") :]
        try:
            index = int(item)
        except (TypeError, ValueError):
            index = None
        if index is None or isinstance(item, bool) or not -len(layers) <= index < len(layers):
            raise ValueError(
                f"{who}: at= takes layer indices 0..{len(layers) - 1} of the YAML (or 'model.<i>' "
                f"paths), got {item!r}"
            )
        index %= len(layers)
        layer = layers[index]
        if hasattr(layer, "forward_fuse"):
            raise ValueError(
                f"{who}: layer {index} is a {type(layer).__name__}; Ultralytics' fuse() (run "
                "before predicting) replaces its forward, which would skip an attention attached "
                "after it. Choose a block layer (C2f, C3k2, SPPF...) or add an AttnZoo row to the "
                "YAML"
            )
        paths.append(f"model.{index}")
    return paths


def attach_to_yolo(
    model: nn.Module,
    attention: Any,
    at: Iterable[int | str] | int | str,
    *,
    identity_init: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Insert attention after layers ``at`` of an Ultralytics model, in place; returns the model.

    Each attention becomes the child ``attention_out`` of layer ``i`` (keys
    ``model.<i>.attention_out.*``) and acts on that layer's output, so every later layer that
    reads it sees the attended features; layer indices, the YAML ``from`` references and every
    original ``state_dict`` key stay as they were, so plain weights still load
    (:func:`load_yolo_weights`). Ultralytics rebuilds the model from its YAML when it trains: use
    :func:`attention_trainer` for training.

    Args:
        model: a ``YOLO`` object or its ``DetectionModel`` (any Ultralytics ``BaseModel``).
        attention: a registry name (``"cbam"``), a module class or a factory (as
            :func:`attnzoo.attach`).
        at: layer indices of the model YAML (``[6, 8, 9]``, negative from the end) or
            ``"model.<i>"`` paths. Single conv layers are refused (see Raises).
        identity_init: the model computes exactly its original function at initialisation
            (:class:`attnzoo.models.IdentityInit`), so fine-tuning starts from the pretrained
            accuracy.
        **kwargs: the attention's keyword arguments (``reduction=8``, ``preset="timm"``).

    Raises:
        ValueError: a bad index; a ``Conv``-type layer, whose forward Ultralytics' ``fuse()``
            replaces before predicting; and the errors of :func:`attnzoo.attach`.
    """
    who = "attnzoo.integrations.ultralytics.attach_to_yolo"
    net = _detection_model(model, who)
    paths = _layer_paths(net, at, who)
    channels = int(net.yaml.get("channels", 3)) if isinstance(net.yaml, dict) else 3
    stride = int(getattr(net, "stride", torch.tensor([32])).max())
    size = max(64, 2 * stride)  # at least 2x2 at the coarsest level
    example = (1, channels, size, size)  # the dry run that reads the channel counts
    attach(
        net, attention, after=paths, example_input=example, identity_init=identity_init, **kwargs
    )
    return model


def _state_dict(weights: Any, who: str) -> Mapping[str, Tensor]:
    """A float state dict from an Ultralytics checkpoint path, a model or a state dict."""
    if isinstance(weights, Mapping) and all(isinstance(v, Tensor) for v in weights.values()):
        return weights
    if isinstance(weights, (str, Path)):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{who}: no checkpoint file {str(weights)!r}")
        _ultralytics()
        from ultralytics.nn.tasks import load_checkpoint

        weights, _ = load_checkpoint(str(weights))
    elif isinstance(weights, Mapping):  # a checkpoint dict: {"ema": model, "model": model, ...}
        weights = weights.get("ema") or weights.get("model")
    if not isinstance(weights, nn.Module):
        raise TypeError(
            f"{who}: weights must be an Ultralytics checkpoint path, a model or a state dict, got "
            f"{type(weights).__name__}"
        )
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.state_dict().items()}


def load_yolo_weights(model: nn.Module, weights: Any) -> list[str]:
    """Load a plain model's weights into one with attention attached; returns the new keys.

    Every tensor of the original network must be present with the same shape (a checkpoint of
    another scale or class count raises ``RuntimeError`` naming the keys); the only keys allowed
    to be missing are those of the inserted modules, which keep their initialisation.

    Args:
        model: a ``YOLO`` object or ``DetectionModel`` after :func:`attach_to_yolo`.
        weights: an Ultralytics checkpoint file (loaded with Ultralytics' ``load_checkpoint``,
            which unpickles it: load only files you trust), a model, or a state dict.

    Returns:
        The attention keys that were not in ``weights`` (sorted).
    """
    who = "attnzoo.integrations.ultralytics.load_yolo_weights"
    net = _detection_model(model, who)
    return load_pretrained(net, _state_dict(weights, who))


def _trainer_class() -> type:
    """``AttnZooDetectionTrainer``, created on first use (it subclasses Ultralytics' trainer)."""
    cached = globals().get("_TRAINER")
    if cached is not None:
        return cached
    _ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import LOGGER

    class AttnZooDetectionTrainer(DetectionTrainer):
        """Ultralytics' ``DetectionTrainer`` whose ``get_model`` attaches attention.

        Set the class attributes in a subclass (or use :func:`attention_trainer`):
        ``attnzoo_attention`` (registry name), ``attnzoo_at`` (layer indices),
        ``attnzoo_identity_init`` (default True) and ``attnzoo_kwargs``. ``get_model`` builds
        the YAML model, attaches, then loads the pretrained model Ultralytics passes with
        Ultralytics' own ``load`` (which transfers the tensors whose names and shapes match, and
        adapts the class-count-dependent head); the keys not loaded from those weights (the
        attention's, and a head whose class count changed) are logged and kept in
        ``self.attnzoo_new_keys`` (None when training from scratch).
        """

        attnzoo_attention: Any = None
        attnzoo_at: tuple[int | str, ...] = ()
        attnzoo_identity_init: bool = True
        attnzoo_kwargs: Mapping[str, Any] = {}

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            if self.attnzoo_attention is None:
                raise ValueError(
                    "AttnZooDetectionTrainer: set attnzoo_attention and attnzoo_at in a "
                    "subclass, or use attnzoo.integrations.ultralytics.attention_trainer(...)"
                )
            model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
            attach_to_yolo(
                model,
                self.attnzoo_attention,
                self.attnzoo_at,
                identity_init=self.attnzoo_identity_init,
                **dict(self.attnzoo_kwargs),
            )
            names = ", ".join(a.path for a in attached(model))
            self.attnzoo_new_keys = None
            if weights:
                given = weights.float().state_dict()
                model.load(weights, verbose=verbose)
                self.attnzoo_new_keys = sorted(
                    k
                    for k, v in model.state_dict().items()
                    if k not in given or given[k].shape != v.shape
                )
                names += f"; {len(self.attnzoo_new_keys)} tensors not in the pretrained weights"
            LOGGER.info(f"attnzoo: {self.attnzoo_attention} at {names}")
            return model

    AttnZooDetectionTrainer.__module__ = __name__
    AttnZooDetectionTrainer.__qualname__ = "AttnZooDetectionTrainer"
    globals()["_TRAINER"] = AttnZooDetectionTrainer
    return AttnZooDetectionTrainer


def attention_trainer(
    attention: Any,
    at: Iterable[int | str] | int | str,
    *,
    identity_init: bool = True,
    **kwargs: Any,
) -> type:
    """A ``DetectionTrainer`` class for ``YOLO(...).train(trainer=...)`` that attaches attention.

    Ultralytics builds a fresh model from the YAML when it trains, then loads the weights of the
    model you called ``train`` on; this trainer attaches ``attention`` after layers ``at`` in
    between (:func:`attach_to_yolo`), so official YAMLs and their pretrained checkpoints work
    unchanged. The saved checkpoints contain the attention and reload wherever attnzoo is
    installed. The returned class is made at run time: for multi-GPU (DDP) training, which
    imports the trainer class by name, subclass :class:`AttnZooDetectionTrainer` in your own
    module instead.

    Example::

        model = YOLO("yolov8n.pt")
        model.train(data="data.yaml", trainer=attention_trainer("cbam", at=[6, 8, 9]))
    """
    who = "attnzoo.integrations.ultralytics.attention_trainer"
    if not isinstance(identity_init, bool):
        raise TypeError(f"{who}: identity_init must be True or False, got {identity_init!r}")
    if isinstance(attention, str):
        info(attention)  # unknown names fail here, not at the start of training
    at = (at,) if isinstance(at, (int, str)) else tuple(at)
    if not at:
        raise ValueError(f"{who}: at= is empty; give layer indices such as [6, 8, 9]")
    base = _trainer_class()
    label = attention if isinstance(attention, str) else getattr(attention, "__name__", "custom")
    return type(
        f"AttnZooDetectionTrainer_{label}",
        (base,),
        {
            "__module__": __name__,
            "attnzoo_attention": attention,
            "attnzoo_at": at,
            "attnzoo_identity_init": identity_init,
            "attnzoo_kwargs": dict(kwargs),
        },
    )


def __getattr__(name: str) -> Any:  # PEP 562: the trainer class exists once ultralytics is there
    if name == "AttnZooDetectionTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# 3. a detector for attnzoo's detect bench
#: the model YAMLs (shipped with Ultralytics) that :func:`yolo_detector` builds by name
YOLO_MODELS = ("yolov8n", "yolov8s", "yolo11n", "yolo11s")


def _yolo_batch(images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """attnzoo's detection batch (xyxy pixel boxes per image) in Ultralytics' training form:
    ``img``, ``batch_idx (n,)``, ``cls (n, 1)``, ``bboxes (n, 4)`` (xywh, fractions)."""
    h, w = images.shape[-2:]
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(images)
    labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(images)
    index = torch.cat(
        [torch.full((len(t["labels"]),), i, dtype=images.dtype) for i, t in enumerate(targets)]
    ).to(images.device)
    scale = boxes.new_tensor([w, h, w, h])
    xywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / scale
    return {"img": images, "batch_idx": index, "cls": labels[:, None], "bboxes": xywh}


class UltralyticsDetector(nn.Module):
    """An Ultralytics ``DetectionModel`` (in ``self.net``) with the interface of attnzoo's
    detect bench: images in ``[0, 1]``, targets as dicts of xyxy pixel ``boxes`` and ``labels``
    from 0.

    - ``forward(images)``: the network's own output (feature maps in training; in eval mode
      ``(y, raw)`` with ``y`` ``(B, 4 + classes, anchors)``: xywh pixel boxes and per-class
      sigmoid scores);
    - :meth:`loss`: Ultralytics' own criterion (``DetectionModel.loss``: task-aligned
      assignment, CIoU + DFL + BCE with the gains of Ultralytics' default configuration), per
      image (its trainer's value divided by the batch size);
    - :meth:`predict`: detections in attnzoo's form.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net: Any = _detection_model(
            net, "attnzoo.integrations.ultralytics.UltralyticsDetector"
        )

    def forward(self, images: Tensor) -> Any:
        return self.net(images)

    def loss(
        self, images: Tensor, targets: list[dict[str, Tensor]], preds: Any = None
    ) -> dict[str, Tensor]:
        """``{"loss", "box", "cls", "dfl"}`` per image for a batch (``preds``: this batch's
        output, if already computed)."""
        total, _ = self.net.loss(_yolo_batch(images, targets), preds)
        parts = total / images.shape[0]  # Ultralytics' trainer multiplies by the batch size
        return {"loss": parts.sum(), "box": parts[0], "cls": parts[1], "dfl": parts[2]}

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        *,
        conf_threshold: float = 0.001,
        nms_iou: float = 0.5,
        max_det: int = 300,
        output: Any = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image (``boxes`` xyxy pixels, ``scores``, ``labels``): the best class of
        each anchor with score >= ``conf_threshold``, per-class NMS at ``nms_iou``, the
        ``max_det`` best (the model must be in eval mode; ``output``: its output on ``images``,
        if already computed)."""
        from torchvision.ops import batched_nms, box_convert

        if self.training:
            raise RuntimeError(
                "attnzoo.integrations.ultralytics.UltralyticsDetector.predict: call .eval() first "
                "(in training mode the network returns feature maps, not boxes)"
            )
        out = self.net(images) if output is None else output
        y = out[0] if isinstance(out, (tuple, list)) else out  # (B, 4 + classes, anchors)
        dets = []
        for pred in y.transpose(1, 2):  # (anchors, 4 + classes)
            scores, labels = pred[:, 4:].max(1)
            keep = scores >= conf_threshold
            boxes = box_convert(pred[keep, :4], "cxcywh", "xyxy")
            scores, labels = scores[keep], labels[keep]
            order = batched_nms(boxes, scores, labels, nms_iou)[:max_det]
            dets.append({"boxes": boxes[order], "scores": scores[order], "labels": labels[order]})
        return dets


def yolo_detector(
    name: str = "yolov8n",
    num_classes: int = 80,
    attention: Any = None,
    *,
    at: Iterable[int | str] | int | str | None = None,
    identity_init: bool = False,
    **kwargs: Any,
) -> UltralyticsDetector:
    """A YOLOv8 / YOLO11 detector built offline from Ultralytics' model YAML, with attention.

    Args:
        name: a model YAML Ultralytics ships, without ``.yaml`` (:data:`YOLO_MODELS`, or any
            other detection YAML name it resolves, e.g. ``"yolov8m"``).
        num_classes: classes of the detection head.
        attention: a registry name, module class or factory; ``None`` for the plain model.
        at: where (:func:`attach_to_yolo`); default: after every layer the ``Detect`` head reads
            (the neck's three outputs, layers 15, 18, 21 of YOLOv8), as attention in a YOLO neck.
        identity_init: see :func:`attach_to_yolo`.
        **kwargs: the attention's keyword arguments.
    """
    who = "attnzoo.integrations.ultralytics.yolo_detector"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{who}: name must be a model YAML name such as 'yolov8n'; got {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{who}: num_classes must be an integer >= 1; got {num_classes!r}")
    if attention is None and (kwargs or at is not None):
        raise ValueError(f"{who}: attention options given without attention=")
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no online checks when first imported here
    _ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    try:
        net: Any = DetectionModel(f"{name}.yaml", nc=num_classes, verbose=False)
    except FileNotFoundError as err:
        raise ValueError(f"{who}: Ultralytics has no model YAML {name + '.yaml'!r}") from err
    net.args = get_cfg()  # the loss gains (box 7.5, cls 0.5, dfl 1.5) its criterion reads
    if attention is not None:
        where = list(net.model[-1].f) if at is None else at
        attach_to_yolo(net, attention, where, identity_init=identity_init, **kwargs)
    return UltralyticsDetector(net)


# ---------------------------------------------------------------------------------------------
# offline settings and the YOLO dataset layout
def setup_offline(config_dir: str | os.PathLike) -> Path:
    """Prepare this process to run Ultralytics with no network access; returns ``config_dir``.

    Sets ``YOLO_OFFLINE=1`` (no online checks, hub or analytics) and ``YOLO_CONFIG_DIR``
    (Ultralytics keeps its settings in ``config_dir/Ultralytics``), and copies matplotlib's DejaVu
    Sans there as ``Arial.ttf`` and ``Arial.Unicode.ttf``, the fonts Ultralytics otherwise
    downloads when it checks a dataset. Ultralytics reads both variables when it is first
    imported: call this before. If it was already imported offline, the fonts also go to the
    settings folder it uses.

    Raises:
        RuntimeError: ultralytics was already imported without ``YOLO_OFFLINE=1``.
    """
    folder = Path(config_dir).resolve()
    targets = [folder / "Ultralytics"]  # the sub-folder Ultralytics uses under YOLO_CONFIG_DIR
    loaded = sys.modules.get("ultralytics.utils")
    if loaded is not None:
        if getattr(loaded, "ONLINE", True):
            raise RuntimeError(
                "attnzoo.integrations.ultralytics.setup_offline: ultralytics is already imported "
                "in online mode; call setup_offline before the first 'import ultralytics', or "
                "set YOLO_OFFLINE=1 and YOLO_CONFIG_DIR in the environment"
            )
        targets.append(Path(loaded.USER_CONFIG_DIR))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(folder)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (target / name).is_file():
                shutil.copyfile(font, target / name)
    return folder


def _yolo_lines(boxes: np.ndarray, labels: np.ndarray, height: int, width: int) -> str:
    """``class x_centre y_centre width height`` per box, normalised to ``[0, 1]``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width) / width
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height) / height
    centre_x, centre_y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    rows = zip(labels, centre_x, centre_y, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    return "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows)


def write_yolo_dataset(
    train: DetectionData,
    val: DetectionData,
    root: str | os.PathLike,
    *,
    image_format: str = "png",
) -> Path:
    """Write two splits in the Ultralytics YOLO layout; returns the dataset YAML to train on.

    ``root/images/{train,val}/<name>.png``, one ``root/labels/{train,val}/<name>.txt`` per image
    with a line ``class x_centre y_centre width height`` per box (normalised by the image size,
    boxes clipped to the image), and ``root/data.yaml`` (absolute ``path``, the two splits and the
    class names in label order). Both splits must have the same classes.
    """
    who = "write_yolo_dataset"
    check_writable(who, train)
    check_writable(who, val)
    ext = check_image_format(who, image_format)
    if tuple(train.classes) != tuple(val.classes):
        raise ValueError(
            f"{who}: train and val must have the same classes, got {train.classes} and "
            f"{val.classes}"
        )
    root = Path(root).resolve()
    for split, data in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(data.names):
            image = np.asarray(data.images[i])
            save_image(image, images / f"{name}.{ext}", ext)
            text = _yolo_lines(data.boxes[i], data.labels[i], *image.shape[:2])
            (labels / f"{name}.txt").write_text(text)
    lines = [
        f"path: {json.dumps(str(root))}",
        "train: images/train",
        "val: images/val",
        f"names: {json.dumps([str(c) for c in train.classes])}",
    ]
    yaml_file = root / "data.yaml"
    yaml_file.write_text("\n".join(lines) + "\n")
    return yaml_file
