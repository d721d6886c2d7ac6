"""The ``name:key=value`` syntax shared by ``attnzoo bench``, ``profile`` and ``cam``.

``--attention none,se,cbam:reduction=8`` names registry modules with keyword arguments
(:func:`parse_attentions`); ``--model cifar_resnet8`` or
``--model "cifar_resnet8:model_kwargs={'widths': (16, 32, 64)}"`` names a builder of
:data:`attnzoo.models.BUILDERS` with keyword arguments (:func:`parse_model`,
:func:`attnzoo.models.resolve_builder`). This module
imports no third-party package at import time, so the command line can build its parser without
torch.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BASELINE",
    "DEFAULT_ATTENTIONS",
    "DEFAULT_MODEL",
    "TASKS",
    "AttentionSpec",
    "parse_attentions",
    "parse_model",
    "validate_attentions",
]

#: the tasks of ``attnzoo bench --task`` (plug-ins in :mod:`attnzoo.bench.tasks`)
TASKS = ("classify", "detect", "segment")
DEFAULT_ATTENTIONS = ("none", "se", "cbam", "eca", "gc", "ca", "ema")
DEFAULT_MODEL = "cifar_resnet8"
BASELINE = "none"


@dataclass(frozen=True)
class AttentionSpec:
    """A registry name (or ``none``) with keyword arguments, e.g. ``cbam:reduction=8``."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.name
        return (
            self.name
            + ":"
            + ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.kwargs)
        )

    @property
    def dirname(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.label)
        if safe == self.label:
            return safe
        return f"{safe}-{hashlib.sha1(self.label.encode()).hexdigest()[:6]}"


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_attentions(spec: str | Sequence[str], *, prog: str = "bench") -> list[AttentionSpec]:
    """Parse ``"none,se,cbam:reduction=8,kernel_size=3,eca"``.

    Entries are separated by commas; ``name:key=value`` adds keyword arguments, and a following
    ``key=value`` entry without a name belongs to the previous module. Values are Python literals
    (``8``, ``0.5``, ``True``, ``'att'``) or plain strings.
    """
    tokens: list[str] = []
    for part in [spec] if isinstance(spec, str) else list(spec):
        tokens += [t.strip() for t in str(part).split(",")]
    if not any(tokens):
        raise ValueError(f"{prog}: --attention is empty; give e.g. none,se,cbam")
    specs: list[tuple[str, dict[str, Any]]] = []
    for tok in tokens:
        if not tok:
            continue
        if ":" not in tok and "=" in tok:
            if not specs:
                raise ValueError(f"{prog}: --attention entry {tok!r} has no module name before it")
            key, _, val = tok.partition("=")
            specs[-1][1][key.strip()] = _value(val.strip())
            continue
        name, _, rest = tok.partition(":")
        kwargs: dict[str, Any] = {}
        for kv in filter(None, (s.strip() for s in rest.split(":"))):
            key, eq, val = kv.partition("=")
            if not eq or not key.strip():
                raise ValueError(
                    f"{prog}: cannot read {kv!r} in --attention {tok!r}; expected name:key=value"
                )
            kwargs[key.strip()] = _value(val.strip())
        specs.append((name.strip().lower(), kwargs))
    out = [AttentionSpec(n, tuple(sorted(k.items()))) for n, k in specs]
    labels = [s.label for s in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"{prog}: --attention lists {', '.join(dup)} more than once")
    return out


def validate_attentions(specs: Sequence[AttentionSpec], *, prog: str = "bench") -> None:
    """Unknown names (with the available list), non-2-D modules, unknown keyword arguments."""
    import inspect

    import attnzoo

    avail = attnzoo.available()
    unknown = [s.name for s in specs if s.name != BASELINE and s.name not in avail]
    if unknown:
        raise ValueError(
            f"{prog}: unknown attention {', '.join(map(repr, unknown))}. Available: "
            f"{BASELINE} (the baseline), {', '.join(avail)}"
        )
    for s in specs:
        if s.name == BASELINE:
            if s.kwargs:
                raise ValueError(
                    f"{prog}: {BASELINE} (no attention) takes no arguments; got {s.label}"
                )
            continue
        meta = attnzoo.info(s.name)
        if meta.spatial_dims != 2:
            raise ValueError(
                f"{prog}: {s.name} works on {meta.spatial_dims}-D feature maps; the "
                "networks need a 2-D module (B, C, H, W)"
            )
        params = inspect.signature(meta.cls.__init__).parameters
        takes_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        allowed = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        allowed.add("preset")
        bad = [k for k, _ in s.kwargs if k not in allowed]
        if bad and not takes_var:
            raise ValueError(
                f"{prog}: {meta.cls.__name__} ({s.name}) takes no argument "
                f"{', '.join(map(repr, bad))}; it takes: "
                f"{', '.join(sorted(allowed - {'preset'})) or 'none'}"
            )


# ---------------------------------------------------------------------------------------------
# models
def parse_model(spec: str, *, prog: str = "bench") -> tuple[str, dict[str, Any]]:
    """``"resnet18:zero_init_residual=True:num_classes=5"`` -> ``("resnet18", {...})``.

    Keyword arguments follow the name, each after a ``:``; values are Python literals
    (``model_kwargs={'widths': (16, 32, 64)}`` works) or plain strings.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{prog}: --model must be a builder name such as {DEFAULT_MODEL!r}; got {spec!r}"
        )
    name, _, rest = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    # split at the colons that start a "key=" (a dict literal's colons stay in its value)
    for kv in filter(None, (s.strip() for s in re.split(r":(?=\s*[A-Za-z_]\w*\s*=)", rest))):
        key, eq, val = kv.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(
                f"{prog}: cannot read {kv!r} in --model {spec!r}; expected name:key=value"
            )
        kwargs[key.strip()] = _value(val.strip())
    return name.strip(), kwargs
