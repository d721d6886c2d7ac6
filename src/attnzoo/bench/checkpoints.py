"""Trained networks back from a bench's run folders (``out/runs/<attention>/seed<k>/``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnzoo.bench.tasks import get_task
from attnzoo.bench.train import CHECKPOINT_NAME
from attnzoo.specs import parse_attentions

__all__ = ["load_run_model", "read_run_config"]


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's ``config.json`` (``ValueError`` when the folder is not a bench run)."""
    run_dir = Path(run_dir)
    cfg_file, ckpt_file = run_dir / "config.json", run_dir / CHECKPOINT_NAME
    for f in (cfg_file, ckpt_file):
        if not f.is_file():
            raise ValueError(f"bench: {run_dir} is not a bench run folder ({f.name} is missing)")
    return json.loads(cfg_file.read_text())


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of one run folder in eval mode, and its ``config.json`` (task,
    model, data, attention, seed...). Weights come from ``last.ckpt`` loaded with
    ``weights_only=True``; the network is rebuilt by the run's task
    (:meth:`~attnzoo.bench.tasks.base.Task.model_for_run`). For Grad-CAM panels and attention
    maps of a bench."""
    cfg = read_run_config(run_dir)
    task = get_task(cfg.get("task", "classify"))
    spec = parse_attentions(cfg["attention"])[0]
    _, builder = task.resolve_model(cfg["model"])
    ckpt = torch.load(Path(run_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    meta = dict(cfg)
    if "num_classes" not in meta:  # the classifier is the last 2-D weight of the builders' nets
        meta["num_classes"] = [v for v in state.values() if v.ndim == 2][-1].shape[0]
    model = task.model_for_run(builder, spec, meta)
    model.load_state_dict(state)
    return model.eval(), cfg
