"""Builders' ``weights=``: state dicts, files, torchvision weights from the local hub cache (never
downloaded), a new classifier head; and ``attach`` errors that name the blocks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights

import attnzoo
from attnzoo.models import mobilenet_v2, resnet18, resolve_weights

RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name of ResNet18_Weights.IMAGENET1K_V1's URL


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache under tmp_path; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub" / "checkpoints"


def _plain_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def _same(
    model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k


def test_missing_hub_file_names_file_and_folder_and_downloads_nothing(hub: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        resnet18(weights="IMAGENET1K_V1")
    msg = str(err.value)
    assert RESNET18_FILE in msg and str(hub) in msg and "never downloads" in msg
    assert not hub.exists() or not any(hub.iterdir())
    with pytest.raises(FileNotFoundError, match=RESNET18_FILE):
        resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)


@pytest.mark.parametrize(
    "weights",
    ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1", ResNet18_Weights.IMAGENET1K_V1],
)
def test_weights_name_or_enum_loads_the_hub_cache_file(hub: Path, weights: object) -> None:
    state = _plain_resnet18_state()
    hub.mkdir(parents=True)
    torch.save(state, hub / RESNET18_FILE)
    model = resnet18(attention="se", weights=weights)
    _same(model, state)
    assert len(attnzoo.attached(model)) == 8


def test_unknown_weights_name_lists_the_names(hub: Path) -> None:
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1") as err:
        resnet18(weights="IMAGENET1K_V9")
    assert "neither a file nor" in str(err.value)
    with pytest.raises(TypeError, match="weights must be"):
        resnet18(weights=3)


def test_mobilenet_v2_weights_name(hub: Path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v2().state_dict()
    name = Path(MobileNet_V2_Weights.IMAGENET1K_V1.url).name
    hub.mkdir(parents=True)
    torch.save(state, hub / name)
    _same(mobilenet_v2(attention="ca", select="expanded", weights="IMAGENET1K_V1"), state)


def test_state_dict_and_file_path(tmp_path: Path) -> None:
    state = _plain_resnet18_state()
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    for weights in (state, path, str(path)):
        _same(resnet18(attention="eca", weights=weights), state)
    assert resolve_weights(state) is state


def test_new_num_classes_loads_the_rest_and_reports_the_head(tmp_path: Path) -> None:
    state = _plain_resnet18_state()
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    torch.manual_seed(1)
    with pytest.warns(
        UserWarning,
        match=r"new classifier head.*fc\.bias \(1000,\) -> \(10,\), "
        r"fc\.weight \(1000, 512\) -> \(10, 512\)",
    ):
        model = resnet18(attention="cbam", num_classes=10, weights=path)
    _same(model, state, skip=("fc.",))
    assert model.fc.weight.shape == (10, 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with warnings.catch_warnings():  # the same head: no warning
        warnings.simplefilter("error")
        resnet18(weights=path)


def test_other_shape_mismatch_still_raises() -> None:
    state = _plain_resnet18_state()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(RuntimeError, match=r"shape mismatch.*layer1\.0\.conv1\.weight"):
        resnet18(num_classes=10, weights=state)


# ---------------------------------------------------------------------------------------------
# attach errors name the blocks
def test_no_known_blocks_lists_the_module_types_found() -> None:
    with pytest.raises(ValueError, match="no known residual blocks") as err:
        attnzoo.attach(torchvision.models.vgg11(), "se")
    assert "VGG" in str(err.value) and "after=" in str(err.value)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"only torch.nn layers \(Sequential, Conv2d, ReLU\)"):
        attnzoo.attach(plain, "se")


def test_attach_failure_names_the_block_and_why() -> None:
    model = torchvision.models.mobilenet_v2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        attnzoo.attach(model, "ema")
    msg = str(err.value)
    assert "InvertedResidual 'features.3'" in msg and "144 channels" in msg
    assert "divisible by factor" in msg and "select=" in msg
    assert attnzoo.attached(model) == [] and model.state_dict().keys() == before.keys()
