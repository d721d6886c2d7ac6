"""The registry's public API: create/get/info/available and their errors."""

from __future__ import annotations

import functools

import pytest
from torch import nn

import attnzoo
from attnzoo.registry import FAMILIES


def test_available_lists_every_family_member() -> None:
    names = attnzoo.available()
    assert names == sorted(names)
    for family in FAMILIES:
        members = attnzoo.available(family)
        assert all(attnzoo.info(n).family == family for n in members)
    assert sorted(sum((attnzoo.available(f) for f in FAMILIES), [])) == names


def test_available_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        attnzoo.available("temporal")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown attention 'cbma'.*Did you mean 'cbam'"):
        attnzoo.create("cbma", 64)


def test_name_lookup_is_case_insensitive() -> None:
    assert attnzoo.get("SE") is attnzoo.get("se")


def test_info_has_paper_metadata() -> None:
    for name in attnzoo.available():
        meta = attnzoo.info(name)
        assert meta.paper and meta.venue and meta.code.startswith("https://")
        assert 2000 < meta.year < 2030
        assert "official" in meta.presets and meta.presets["official"] == {}
        assert meta.summary, f"{name} has no docstring summary"
        assert meta.cls.__doc__ and str(meta.year) in meta.cls.__doc__, (
            f"{name}: the docstring should cite the paper with its year"
        )


def test_create_accepts_class_and_partial() -> None:
    cls = attnzoo.get("se")
    assert isinstance(attnzoo.create(cls, 64), cls)
    made = attnzoo.create(functools.partial(cls, reduction=4), 64)
    assert isinstance(made, cls)
    assert made.state_dict().keys() == cls(64, reduction=4).state_dict().keys()
    assert sum(p.numel() for p in made.parameters()) == attnzoo.info("se").count_params(
        64, reduction=4
    )


def test_create_accepts_any_factory() -> None:
    made = attnzoo.create(lambda c: nn.Identity(), 64)
    assert isinstance(made, nn.Identity)


def test_create_applies_presets_and_explicit_kwargs_win() -> None:
    meta = attnzoo.info("cbam")
    assert "yolov4-tiny" in meta.presets
    preset_kwargs = dict(meta.presets["yolov4-tiny"])
    module = attnzoo.create("cbam", 64, preset="yolov4-tiny")
    reference = attnzoo.get("cbam")(64, **preset_kwargs)
    assert module.state_dict().keys() == reference.state_dict().keys()
    key, value = next(iter(preset_kwargs.items()))
    assert meta.resolve_kwargs({key: "explicit"}, "yolov4-tiny")[key] == "explicit"


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        attnzoo.create("se", 64, preset="imaginary")


def test_preset_with_unregistered_factory_raises() -> None:
    with pytest.raises(ValueError, match="preset"):
        attnzoo.create(lambda c: nn.Identity(), 64, preset="timm")


def test_unknown_keyword_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"SqueezeExcitation.*Keyword arguments it takes"):
        attnzoo.create("se", 64, ratioo=4)


def test_attention_must_be_name_or_callable() -> None:
    with pytest.raises(TypeError, match="registry name"):
        attnzoo.create(42, 64)


def test_modules_take_factory_device_and_dtype_keywords() -> None:
    """timm's attn_layer hook calls attn_layer(channels, device=..., dtype=...)."""
    import torch

    for name in attnzoo.available():
        meta = attnzoo.info(name)
        module = meta.cls(meta.example_channels, device="cpu", dtype=torch.float64)
        floats = [p for p in module.parameters() if p.is_floating_point()]
        assert all(p.dtype == torch.float64 for p in floats), name
        assert "dtype" not in meta.defaults and "device" not in meta.defaults
    made = attnzoo.create("se", 64, dtype=torch.float64)
    assert made.fc1.weight.dtype == torch.float64


@pytest.mark.parametrize("name", ["se", "nonlocal2d"])
def test_count_params_without_formula_builds_on_meta(name: str) -> None:
    import dataclasses

    import torch

    meta = dataclasses.replace(attnzoo.info(name), param_count=None)
    built = meta.cls(96, reduction=4) if name == "se" else meta.cls(96, inter_channels=20)
    kwargs = {"reduction": 4} if name == "se" else {"inter_channels": 20}
    assert meta.count_params(96, **kwargs) == sum(p.numel() for p in built.parameters())
    assert torch.empty(1).device.type == "cpu"  # the meta device context did not leak


def test_loaders_run_once_before_the_next_lookup():
    from attnzoo import registry

    calls = []
    registry.add_loader(lambda: calls.append(1))
    assert registry.available() and calls == [1]
    registry.info("se")
    assert calls == [1]
    with pytest.raises(TypeError, match="add_loader: expected a callable"):
        registry.add_loader("attnzoo.modules")


def test_the_registry_alone_sees_every_module_in_a_fresh_process():
    import subprocess
    import sys

    code = (
        "import sys, attnzoo.registry as r\n"
        "assert 'torch' not in sys.modules\n"
        "names = r.available()\n"
        "import attnzoo.modules, pkgutil\n"
        "files = [m.name for m in pkgutil.iter_modules(attnzoo.modules.__path__)]\n"
        "print(len(names), len(files))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_names, n_files = map(int, out.stdout.split())
    assert n_names >= n_files > 10  # every paper file registers at least one module
