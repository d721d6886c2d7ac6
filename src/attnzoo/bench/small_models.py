"""The bench's small networks; they live in :mod:`attnzoo.models.small` (re-exported here)."""

from __future__ import annotations

from attnzoo.models.small import SmallResNet, cifar_resnet8

__all__ = ["SmallResNet", "cifar_resnet8"]
