"""Command-line conventions: ``python -m attnzoo``, ``--version``, a parser that imports no heavy
library, exit codes (0 done, 2 usage or bad input, 1 failure) for every subcommand, shared model
names and ``name:key=value`` syntax, device requests that cannot be met, ``cam``'s class check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo import cli
from attnzoo.bench.engine import check_devices
from attnzoo.bench.run import run
from attnzoo.cli import main
from attnzoo.models import BUILDERS, cifar_resnet8

SUBCOMMANDS = ("list", "info", "profile", "bench", "cam")
#: the smallest valid argument list of each subcommand (for the failure test)
VALID = {
    "list": ["list"],
    "info": ["info", "se"],
    "profile": ["profile"],
    "bench": ["bench"],
    "cam": ["cam", "--checkpoint", "x"],
}


def _attnzoo(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attnzoo", *argv], capture_output=True, text=True, timeout=300
    )


def test_python_m_attnzoo_is_the_command() -> None:
    version = _attnzoo("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"attnzoo {attnzoo.__version__}"
    listed = _attnzoo("list")
    assert listed.returncode == 0 and "cbam" in listed.stdout.split()
    assert _attnzoo("nonsense").returncode == 2


def test_parser_and_help_import_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import attnzoo.cli as cli\n"
        "parser = cli.build_parser()\n"
        "for argv in (['--help'], ['bench', '--help'], ['profile', '--help'], ['cam', '--help'],"
        " ['list', '--help']):\n"
        "    try:\n"
        "        parser.parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'torchvision', 'lightning', 'matplotlib', 'timm')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_bench_help_prints_a_plain_percent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "%%" not in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_usage_errors_exit_2(command: str) -> None:
    proc = _attnzoo(*VALID[command], "--no-such-option")
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-option" in proc.stderr


BAD_INPUT = {
    "list": ["list", "--family", "nope"],
    "info": ["info", "cbma"],
    "profile": ["profile", "--model", "resnet5", "--attention", "none"],
    "bench": ["bench", "--attention", "none,nope"],
    "cam": ["cam", "--checkpoint", "does-not-exist"],
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_bad_input_exits_2_with_a_message(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = BAD_INPUT[command]
    if command in ("bench", "cam"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own checks (list --family choices)
        code = exit_.code
    assert code == 2
    assert f"attnzoo {command}: error" in capsys.readouterr().err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_a_failure_while_working_exits_1(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("disk on fire")

    add, _ = cli._COMMANDS[command]
    monkeypatch.setitem(cli._COMMANDS, command, (add, broken))
    assert main(VALID[command]) == 1
    err = capsys.readouterr().err
    assert f"attnzoo {command}: failed: RuntimeError: disk on fire" in err
    assert "Traceback" in err


def test_list_and_info_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0 and main(["info", "eca"]) == 0
    # bench and cam exit 0 in tests/bench (test_localisation.py, test_data.py, ...)


# ---------------------------------------------------------------------------------------------
# one builder table, one name:key=value syntax
def test_one_builder_table_for_bench_profile_and_cam() -> None:
    import importlib.util

    from attnzoo.models import resolve_builder
    from attnzoo.specs import DEFAULT_MODEL

    assert DEFAULT_MODEL in BUILDERS and BUILDERS["cifar_resnet8"] is cifar_resnet8
    assert importlib.util.find_spec("attnzoo.bench.small_models") is None  # no second home
    assert resolve_builder("cifar_resnet8") == ("cifar_resnet8", cifar_resnet8)
    label, builder = resolve_builder("cifar_resnet8:model_kwargs={'widths': (16, 32, 64)}")
    assert label == "cifar_resnet8:model_kwargs={'widths': (16, 32, 64)}"
    assert builder(num_classes=3).fc.in_features == 64
    with pytest.raises(ValueError, match="takes no argument 'depth'"):
        resolve_builder("cifar_resnet8:depth=3")
    with pytest.raises(ValueError, match="Did you mean 'cifar_resnet8'"):
        resolve_builder("cifar_resnet9")


def test_profile_takes_the_bench_model_and_name_key_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "profile",
        "--model",
        "cifar_resnet8",
        "--attention",
        "none,cbam:reduction=8",
        "--input-size",
        "32",
        "--no-latency",
        "--no-memory",
        "--format",
        "json",
    ]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["attention"] for r in rows] == ["none", "cbam:reduction=8"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert rows[0]["params"] == count(cifar_resnet8())
    assert rows[1]["params"] == count(cifar_resnet8(attention="cbam", reduction=8))
    assert rows[1]["params"] != count(cifar_resnet8(attention="cbam"))
    argv = [
        "profile",
        "--model",
        "cifar_resnet8:model_kwargs={'widths': (16, 32, 64)}",
        "--attention",
        "none",
        "--input-size",
        "32",
        "--no-latency",
        "--no-memory",
        "--format",
        "json",
    ]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["params"] == count(cifar_resnet8(model_kwargs={"widths": (16, 32, 64)}))


# ---------------------------------------------------------------------------------------------
# devices
def test_gpu_request_without_gpu_is_a_clear_error_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "out"
    assert main(["bench", "--accelerator", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--accelerator gpu asks for a CUDA GPU, but this machine has none" in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(ValueError, match="has none"):
        run("none", accelerator="cuda", out=out)


def test_more_devices_than_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_devices("gpu", 2)
    check_devices("gpu", [0, 1])
    check_devices("gpu", "auto")
    with pytest.raises(ValueError, match="--devices 4 needs 4 CUDA GPU.*has 2"):
        check_devices("gpu", 4)
    with pytest.raises(ValueError, match=r"--devices 0,3 \(index 3\) needs 4"):
        check_devices("gpu", [0, 3])
    with pytest.raises(ValueError, match="--accelerator must be one of"):
        check_devices("tpu9", 1)
    with pytest.raises(ValueError, match="CPUs do not have"):
        check_devices("cpu", [0, 1])
    with pytest.raises(ValueError, match="--devices must be"):
        check_devices("cpu", 0)
    check_devices("cpu", 4)  # CPU devices are processes: any count can run


# ---------------------------------------------------------------------------------------------
# cam: class count and class names
def _fake_run(root: Path, classes: list[str]) -> Path:
    """A bench run folder (config.json + last.ckpt) of an untrained cifar_resnet8."""
    run_dir = root / "runs" / "none" / "seed0"
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = cifar_resnet8(num_classes=len(classes))
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        run_dir / "last.ckpt",
    )
    cfg = {
        "model": "cifar_resnet8",
        "data": "digits",
        "data_seed": 0,
        "image_size": 32,
        "n_train": 100,
        "n_test": 40,
        "attention": "none",
        "seed": 0,
        "num_classes": len(classes),
        "classes": classes,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    (run_dir / "config.json").write_text(json.dumps(cfg))
    return run_dir


def test_cam_rejects_data_with_another_class_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _fake_run(tmp_path, ["circle", "square", "triangle"])
    code = main(
        [
            "cam",
            "--checkpoint",
            str(run_dir),
            "--data",
            "digits",
            "--n",
            "2",
            "--out",
            str(tmp_path / "cams"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--data digits has 10 classes" in err and "trained on 3" in err
    assert not (tmp_path / "cams").exists()


def test_cam_labels_image_rows_with_the_checkpoint_class_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from attnzoo.bench import localisation

    run_dir = _fake_run(tmp_path, ["circle", "square", "triangle"])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 90, 200)).save(images / f"im{i}.png")
    seen: dict[str, object] = {}

    def capture(
        models: object, inputs: object, display: object, out: object, **kwargs: object
    ) -> list[Path]:
        seen.update(kwargs)
        return []

    monkeypatch.setattr(localisation, "write_panels", capture)
    localisation.make_cam_panels(run_dir, tmp_path / "cams", images=images, n=2)
    assert seen["classes"] == ["circle", "square", "triangle"]
    assert localisation._row_labels(torch.tensor([2, 0]), None, seen["classes"]) == [
        "pred triangle",
        "pred circle",
    ]
