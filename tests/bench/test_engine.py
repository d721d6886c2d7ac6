"""The task-generic engine: the task table, one validated config, and a plug-in other than
classification run end to end through the same stages (results, report, resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from attnzoo.bench import engine
from attnzoo.bench.data import SeededSampler
from attnzoo.bench.engine import BenchConfig, validate
from attnzoo.bench.report import Section, Text
from attnzoo.bench.run import run
from attnzoo.bench.tasks import get_task
from attnzoo.bench.tasks.base import Task, TaskData, TaskReport, call_builder
from attnzoo.cli import main
from attnzoo.models import cifar_resnet8
from attnzoo.specs import TASKS


# ---------------------------------------------------------------------------------------------
# the task table
def test_tasks_are_found_by_name_and_unknown_ones_are_clear_errors() -> None:
    task = get_task("classify")
    assert isinstance(task, Task) and task.name == "classify"
    assert (task.metric, task.metric_label) == ("test_acc", "top-1 %")
    assert TASKS == ("classify", "detect", "segment")
    with pytest.raises(ValueError, match=r"unknown --task 'classification'.*classify, detect"):
        get_task("classification")


def test_a_task_without_its_plug_in_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a task name the table knows but whose plug-in module does not exist (as ``segment`` was
    # before its plug-in): a clear error, exit code 2 and nothing written
    import attnzoo.bench.tasks as tasks
    import attnzoo.specs as specs

    for module in (tasks, specs):
        monkeypatch.setattr(module, "TASKS", (*specs.TASKS, "nosuchtask"))
    with pytest.raises(ValueError, match=r"--task nosuchtask is not available"):
        get_task("nosuchtask")
    out = tmp_path / "out"
    assert main(["bench", "--task", "nosuchtask", "--out", str(out)]) == 2
    assert "--task nosuchtask is not available" in capsys.readouterr().err
    assert not out.exists()


def test_validate_fills_the_task_defaults_and_normalises(tmp_path: Path) -> None:
    bench = validate(BenchConfig(attention="none,se", seeds=2, out=tmp_path, localise=False))
    c = bench.config
    assert (c.model, c.data, c.epochs, c.batch_size, c.lr, c.weight_decay, c.image_size) == (
        "cifar_resnet8",
        "digits",
        8,
        64,
        0.1,
        5e-4,
        32,
    )
    assert c.seeds == [0, 1] and [s.label for s in bench.specs] == ["none", "se"]
    assert bench.baseline == "none" and bench.model_name == "cifar_resnet8"
    assert BenchConfig().epochs is None  # unset: the task decides
    defaults = validate(BenchConfig(out=tmp_path, localise=False)).config
    assert defaults.attention == ("none", "se", "cbam", "eca", "gc", "ca", "ema")


@pytest.mark.parametrize("task", ["classify", "detect"])
@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_panel_images_is_checked_for_every_task(tmp_path: Path, task: str, bad: object) -> None:
    with pytest.raises(ValueError, match=r"--panel-images must be an integer >= 0"):
        validate(BenchConfig(task=task, panel_images=bad, out=tmp_path))  # type: ignore[arg-type]


def test_run_takes_a_config_and_overrides(tmp_path: Path) -> None:
    config = BenchConfig(attention="none,se", out=tmp_path, localise=False)
    with pytest.raises(ValueError, match="unknown attention 'sse'"):
        run(config, attention="none,sse")  # the override wins
    with pytest.raises(ValueError, match="--epochs must be an integer >= 1"):
        run(config=config, epochs=0)
    assert config.attention == "none,se" and config.epochs is None  # not modified
    assert not (tmp_path / "runs").exists()


def test_unknown_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'epoch'.*epochs"):
        run("none", epoch=3, out=tmp_path)
    with pytest.raises(ValueError, match=r"--task classify takes no option 'phi'"):
        run("none", options={"phi": 1}, out=tmp_path, localise=False)
    with pytest.raises(TypeError, match="expected a BenchConfig"):
        validate({"attention": "none"})  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# a second task through the same engine
class _ToyData:
    """Two classes told apart by the mean brightness of 8x8 images."""

    name = "toy"
    description = "toy brightness data"
    classes = ["dark", "bright"]

    def __init__(self, n_train: int, n_test: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.train = self._split(n_train, gen)
        self.test = self._split(n_test, gen)

    @staticmethod
    def _split(n: int, gen: torch.Generator) -> TensorDataset:
        y = torch.arange(n) % 2
        x = torch.randn(n, 3, 8, 8, generator=gen) + (2.0 * y - 1.0).view(-1, 1, 1, 1)
        return TensorDataset(x, y)

    @property
    def n_train(self) -> int:
        return len(self.train)

    def describe(self) -> dict[str, Any]:
        return {"n_train": len(self.train), "n_test": len(self.test)}


def _toy_module(model: nn.Module, lr: float) -> Any:
    import lightning.pytorch as pl

    class ToyModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.history: list[dict[str, Any]] = []
            self._hits: list[torch.Tensor] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self._loss = float(loss.detach())
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self._hits.append(self.model(x).argmax(1) == y)

        def on_train_epoch_end(self) -> None:
            hits = torch.cat(self._hits).float()
            self._hits = []
            self.history.append(
                {
                    "epoch": self.current_epoch + 1,
                    "train_loss": self._loss,
                    "hit_rate": float(hits.mean()),
                    "n": len(hits),
                    "lr": lr,
                    "seconds": 0.0,
                }
            )

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.model.parameters(), lr=lr)

    return ToyModule()


class ToyTask(Task):
    name = "toy"
    metric = "hit_rate"
    metric_label = "hit rate %"
    defaults = {
        "attention": ("none", "se"),
        "model": "cifar_resnet8",
        "data": "toy",
        "epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "weight_decay": 0.0,
        "image_size": 8,
    }
    options = {"brightness": 1.0}
    csv_columns = ("n",)

    def __init__(self) -> None:
        self.steps: list[int] = []

    def check_schedule(self, config: Any, steps_per_epoch: int) -> None:
        self.steps.append(steps_per_epoch)

    def load_data(self, config: Any) -> TaskData:
        return _ToyData(config.n_train or 32, config.n_test or 20)

    def build_model(self, builder: Any, spec: Any, data: Any, config: Any) -> nn.Module:
        model = call_builder(builder, spec, num_classes=2)
        model(data.test.tensors[0][:2])
        return model

    def input_shape(self, data: Any, config: Any) -> tuple[int, ...]:
        return (3, 8, 8)

    def make_module(self, model: nn.Module, data: Any, config: Any) -> Any:
        return _toy_module(model, config.lr)

    def make_loaders(self, data: Any, config: Any, *, seed: int) -> tuple[DataLoader, DataLoader]:
        return (
            DataLoader(
                data.train,
                batch_size=config.batch_size,
                sampler=SeededSampler(len(data.train), seed=seed),
            ),
            DataLoader(data.test, batch_size=64),
        )

    def final_row(self, history: Any, module: Any) -> dict[str, Any]:
        return {**super().final_row(history, module), "n": history[-1]["n"]}

    def report(self, result: Any, data: Any, config: Any, plan: Any) -> TaskReport:
        return TaskReport(setup="Toy setup.", sections=[Section("Toy panel", [Text("hello")])])


@pytest.fixture
def _one_thread(torch_threads):
    torch_threads(1)


@pytest.mark.slow
def test_another_task_runs_through_the_same_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _one_thread: None
) -> None:
    task = ToyTask()
    monkeypatch.setattr(engine, "get_task", lambda name: task)
    result = run(
        "none,se",
        task="toy",
        seeds=[0, 1],
        out=tmp_path,
        progress=False,
        profile=False,
        options={"brightness": 2.0},
    )
    assert task.steps == [2]  # 32 images at batch 16, checked before training
    payload = json.loads((tmp_path / "results.json").read_text())
    assert (payload["task"], payload["metric"], payload["metric_label"]) == (
        "toy",
        "hit_rate",
        "hit rate %",
    )
    assert payload["config"]["brightness"] == 2.0 and payload["config"]["task"] == "toy"
    for r in payload["runs"]:
        assert r["metric"] == r["hit_rate"] and 0.0 <= r["hit_rate"] <= 1.0 and r["n"] == 20
        assert "test_acc" not in r
    se = next(s for s in payload["summary"] if s["attention"] == "se")
    hits = {r["seed"]: r["hit_rate"] for r in payload["runs"] if r["attention"] == "se"}
    base = {r["seed"]: r["hit_rate"] for r in payload["runs"] if r["attention"] == "none"}
    assert se["metric"] == se["hit_rate"] == pytest.approx(sum(hits.values()) / 2)
    assert se["diff_vs_baseline"] == pytest.approx(sum(hits[s] - base[s] for s in (0, 1)) / 2)
    csv_header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"task", "metric", "hit_rate", "hit_rate_std", "n"} <= set(csv_header)
    md = result.report_md.read_text()
    assert "| attention | hit rate % (mean ± std) | Δ vs none [95% CI] |" in md
    assert "Toy setup." in md and "## Toy panel" in md and "top-1" not in md
    cfg = json.loads((tmp_path / "runs" / "se" / "seed1" / "config.json").read_text())
    assert cfg["task"] == "toy" and cfg["classes"] == ["dark", "bright"]
    ckpt = torch.load(tmp_path / "runs" / "se" / "seed1" / "last.ckpt", weights_only=True)
    assert ckpt["bench_history"] == next(
        r["history"] for r in payload["runs"] if (r["attention"], r["seed"]) == ("se", 1)
    )
    again = run(
        "none,se",
        task="toy",
        seeds=[0, 1],
        out=tmp_path,
        progress=False,
        profile=False,
        report=False,
        options={"brightness": 2.0},
    )
    assert len(again.skipped) == 4
    assert [r["hit_rate"] for r in again.runs] == [r["hit_rate"] for r in payload["runs"]]
    with pytest.raises(ValueError, match=r"other settings.*brightness"):
        run(
            "none,se",
            task="toy",
            seeds=[0, 1],
            out=tmp_path,
            progress=False,
            profile=False,
            options={"brightness": 3.0},
        )
    # the builder table is the models' one
    assert engine.validate(BenchConfig(task="toy", out=tmp_path)).builder is cifar_resnet8


# ---------------------------------------------------------------------------------------------
# several models: every (model, attention) arm
_NARROW = "cifar_resnet8:model_kwargs={'widths': (16, 32, 64)}"


def test_split_models_keeps_commas_inside_arguments() -> None:
    assert engine.split_models(f"{_NARROW}, cifar_resnet8") == [_NARROW, "cifar_resnet8"]
    assert engine.split_models("a:name='x,y',b") == ["a:name='x,y'", "b"]
    assert engine.split_models(cifar_resnet8) == [cifar_resnet8]
    with pytest.raises(ValueError, match="empty entry"):
        engine.split_models("cifar_resnet8,")


def test_several_models_make_model_attention_arms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "get_task", lambda name: ToyTask())
    models = f"{_NARROW},cifar_resnet8"
    bench = validate(BenchConfig("none,se", task="toy", model=models, out=tmp_path))
    narrow = list(bench.builders)[0]
    assert bench.model_name == f"{narrow},cifar_resnet8"
    labels = [s.label for s in bench.specs]
    assert labels == [f"{narrow}/none", f"{narrow}/se", "cifar_resnet8/none", "cifar_resnet8/se"]
    assert bench.baseline == f"{narrow}/none"  # the first model's baseline attention
    assert bench.specs[3].dirname == "cifar_resnet8/se" and bench.specs[3].name == "se"
    for given, want in (("se", f"{narrow}/se"), ("cifar_resnet8/none", "cifar_resnet8/none")):
        b = validate(
            BenchConfig(
                "none,se",
                task="toy",
                model=f"{_NARROW},cifar_resnet8",
                out=tmp_path,
                baseline=given,
            )
        )
        assert b.baseline == want
    with pytest.raises(ValueError, match="names no model"):
        validate(
            BenchConfig(
                "none",
                task="toy",
                model="cifar_resnet8,mobilenet_v2",
                baseline="resnet18/none",
                out=tmp_path,
            )
        )
    with pytest.raises(ValueError, match="lists a model twice"):
        validate(BenchConfig("none", task="toy", model="cifar_resnet8,cifar_resnet8", out=tmp_path))
    with pytest.raises(ValueError, match="unknown --model 'nosuch'"):
        validate(BenchConfig("none", task="toy", model="cifar_resnet8,nosuch", out=tmp_path))
    # the built networks differ by model: the narrow trunk has fewer parameters
    engine.build(bench)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in bench.models.items()}
    assert params[f"{narrow}/none"] < params["cifar_resnet8/none"]


def test_several_models_run_resume_and_compare_to_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _one_thread: None
) -> None:
    monkeypatch.setattr(engine, "get_task", lambda name: ToyTask())
    kw = dict(task="toy", seeds=[0, 1], out=tmp_path, progress=False, profile=False)
    result = run("none", model=f"{_NARROW},cifar_resnet8", report=True, **kw)
    payload = json.loads((tmp_path / "results.json").read_text())
    narrow = payload["runs"][0]["model"]
    assert payload["attentions"] == [f"{narrow}/none", "cifar_resnet8/none"]
    hits = {(r["model"], r["seed"]): r["hit_rate"] for r in payload["runs"]}
    wide = next(s for s in payload["summary"] if s["attention"] == "cifar_resnet8/none")
    assert wide["diff_vs_baseline"] == pytest.approx(
        sum(hits[("cifar_resnet8", s)] - hits[(narrow, s)] for s in (0, 1)) / 2
    )
    cfg = json.loads(
        (tmp_path / "runs" / "cifar_resnet8" / "none" / "seed1" / "config.json").read_text()
    )
    assert (cfg["model"], cfg["attention"], cfg["arm"]) == (
        "cifar_resnet8",
        "none",
        "cifar_resnet8/none",
    )
    from attnzoo.bench.checkpoints import read_run_config

    assert read_run_config(tmp_path / "runs" / "cifar_resnet8" / "none" / "seed1") == cfg
    assert "| cifar_resnet8/none |" in result.report_md.read_text()
    # runs are fingerprinted per model: listed in another order, every run is reused
    again = run("none", model=f"cifar_resnet8,{_NARROW}", **kw, report=False)
    assert len(again.skipped) == 4 and again.baseline == "cifar_resnet8/none"
    assert [s["attention"] for s in again.summary] == ["cifar_resnet8/none", f"{narrow}/none"]
