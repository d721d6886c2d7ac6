"""Reports of ``attnzoo bench``: results.json/results.csv, report.md and a self-contained HTML.

A report is a list of :class:`Section` objects, each a title and blocks (:class:`Text`,
:class:`Table`, :class:`Figure`, :class:`Code`). The same sections render to Markdown (figures
saved as PNG files under ``figures/``) and to one HTML file with the PNGs inlined as base64, which
a browser shows offline. Later features add their own sections (e.g. Grad-CAM panels and a
localisation table) by passing ``extra_sections`` to :func:`write_report`.

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnzoo._atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "Code",
    "Figure",
    "Section",
    "Table",
    "Text",
    "atomic_write_bytes",
    "atomic_write_text",
    "fmt_diff",
    "fmt_pct",
    "plot_accuracy",
    "plot_curves",
    "plot_samples",
    "plot_tradeoff",
    "render_html",
    "render_markdown",
    "write_json",
    "write_report",
    "write_results_csv",
]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default,
                                       allow_nan=True) + "\n")


CSV_COLUMNS = ("row", "attention", "seed", "n_seeds", "test_acc", "test_acc_std", "diff_vs_none",
               "diff_low", "diff_high", "verdict", "test_n", "train_acc", "train_loss",
               "params", "flops", "extra_flops", "latency_ms", "peak_mb", "train_seconds")


def write_results_csv(path: str | os.PathLike, runs: Sequence[dict],
                      summary: Sequence[dict]) -> None:
    """One ``row=run`` line per attention × seed, then one ``row=summary`` line per attention."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in runs:
        w.writerow({"row": "run", **r})
    for s in summary:
        w.writerow({"row": "summary", **s})
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# report structure
@dataclass
class Text:
    """A paragraph of Markdown-ish text (``**bold**`` and ``code`` pass through to HTML)."""

    text: str


@dataclass
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Figure:
    """A PNG image; ``name`` is its file name under ``figures/`` in the Markdown report."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Code:
    text: str


Block = Text | Table | Figure | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section], figures_dir: str = "figures") -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"{'#' * sec.level} {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Text):
                out += [b.text, ""]
            elif isinstance(b, Code):
                out += ["```", b.text.rstrip("\n"), "```", ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [b.caption, ""]
                out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
                out.append("|" + "|".join("---" for _ in b.headers) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                out += [f"![{b.caption or b.name}]({figures_dir}/{b.name})", ""]
                if b.caption:
                    out += [f"*{b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def _inline(text: str) -> str:
    """Escape, then turn ``**x**`` into bold and ```x``` into code (enough for our texts)."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", t)
    return t


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.7em;overflow-x:auto}code{background:#f3f3f3;padding:0 .2em}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%}
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        lvl = min(max(sec.level, 2), 6)
        parts.append(f"<h{lvl}>{html.escape(sec.title)}</h{lvl}>")
        for b in sec.blocks:
            if isinstance(b, Text):
                lines = b.text.split("\n")
                if all(ln.startswith("- ") for ln in lines if ln.strip()):
                    items = "".join(f"<li>{_inline(ln[2:])}</li>" for ln in lines if ln.strip())
                    parts.append(f"<ul>{items}</ul>")
                else:
                    parts.append(f"<p>{_inline(b.text)}</p>")
            elif isinstance(b, Code):
                parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
            elif isinstance(b, Table):
                if b.caption:
                    parts.append(f"<p>{_inline(b.caption)}</p>")
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                    for row in b.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                alt = html.escape(b.caption or b.name)
                cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
                parts.append(f"<figure><img alt=\"{alt}\" src=\"data:image/png;base64,{data}\">"
                             f"{cap}</figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out_dir: str | os.PathLike, title: str, sections: Sequence[Section],
                 extra_sections: Sequence[Section] = ()) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``figures/*.png``) and ``report.html``; returns both paths."""
    out = Path(out_dir)
    all_sections = [*sections, *extra_sections]
    for sec in all_sections:
        for b in sec.blocks:
            if isinstance(b, Figure):
                atomic_write_bytes(out / "figures" / b.name, b.png)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, render_markdown(title, all_sections))
    atomic_write_text(page, render_html(title, all_sections))
    return md, page


# ---------------------------------------------------------------------------------------------
# formatting
def fmt_pct(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def fmt_diff(mean: float, low: float, high: float) -> str:
    if math.isnan(low):
        return f"{100 * mean:+.2f} (n/a)"
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend, PNG bytes)
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def plot_accuracy(summary: Sequence[dict], per_seed: dict[str, list[float]]) -> bytes:
    """Bars of mean top-1 with ±1 std error bars, and each seed as a dot."""
    plt = _plt()
    labels = [s["attention"] for s in summary]
    means = [100 * s["test_acc"] for s in summary]
    stds = [100 * s["test_acc_std"] for s in summary]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.6))
    xs = range(len(labels))
    ax.bar(xs, means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
    for i, lab in enumerate(labels):
        ys = [100 * v for v in per_seed.get(lab, [])]
        ax.plot([i] * len(ys), ys, "o", color="#08519c", ms=3.5)
    lo = min([m - s for m, s in zip(means, stds)] + [100 * min(v) for v in per_seed.values()])
    hi = max([m + s for m, s in zip(means, stds)] + [100 * max(v) for v in per_seed.values()])
    pad = max(0.5, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, min(100.5, hi + pad))
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Top-1 per attention: mean ± std over seeds (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_tradeoff(summary: Sequence[dict], key: str, xlabel: str, title: str) -> bytes:
    """Mean top-1 (± std) against a cost (``params``, ``latency_ms``...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s in summary:
        x = s.get(key)
        if x is None or (isinstance(x, float) and math.isnan(x)):
            continue
        ax.errorbar([x], [100 * s["test_acc"]], yerr=[100 * s["test_acc_std"]], fmt="o",
                    capsize=3)
        ax.annotate(s["attention"], (x, 100 * s["test_acc"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_curves(histories: dict[str, list[list[dict]]]) -> bytes:
    """Per attention, mean over seeds per epoch: test top-1 and training loss."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, runs in histories.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        n = min(len(r) for r in runs)
        ep = [runs[0][i]["epoch"] for i in range(n)]
        acc = [100 * sum(r[i].get("test_acc", float("nan")) for r in runs) / len(runs)
               for i in range(n)]
        loss = [sum(r[i]["train_loss"] for r in runs) / len(runs) for i in range(n)]
        a1.plot(ep, acc, marker="o", ms=3, label=label)
        a2.plot(ep, loss, marker="o", ms=3, label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("test top-1 (%)")
    a1.set_title("Test top-1 after each epoch (mean over seeds)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("training loss")
    a2.set_title("Training loss (mean over seeds)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=8, ncol=2)
    return _png(fig)


def plot_samples(images: Any, labels: Sequence[int], classes: Sequence[str],
                 boxes: Any = None, ncols: int = 8) -> bytes:
    """A grid of images (``(N, C, H, W)`` in ``[0, 1]``) titled by class, boxes in red."""
    plt = _plt()
    n = len(labels)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in zip(range(n), axes.flat):
        img = images[i]
        img = img.permute(1, 2, 0).numpy() if hasattr(img, "permute") else img
        if img.shape[-1] == 1 or (img.shape[-1] == 3 and (img[..., 0] == img[..., 1]).all()):
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img)
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor="red", linewidth=1))
        ax.set_title(str(classes[int(labels[i])]), fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# the bench report
HOW_TO_READ = (
    "- **top-1** is the test accuracy after the last epoch, mean ± sample standard deviation over "
    "the seeds. Each seed fixes the initial weights and the order of the training batches; every "
    "attention is trained with the same seeds, so seed *s* of `se` and seed *s* of `none` saw the "
    "same batches in the same order.\n"
    "- **Δ vs none** is the mean over seeds of the paired difference top-1(attention) − "
    "top-1(none), in percentage points, with its 95 % confidence interval from Student's t "
    "distribution with n−1 degrees of freedom.\n"
    "- **no detectable effect**: the interval contains 0. With these seeds and this data the "
    "module cannot be told apart from the baseline; it does not mean the effect is exactly 0. "
    "More seeds narrow the interval.\n"
    "- The test images are never used for choosing anything (no early stopping, no best-epoch "
    "pick); the curves are shown for information only.\n"
    "- **params / MFLOPs / latency** are for the whole network and one image on this machine's "
    "CPU. MFLOPs are counted by `torch.utils.flop_counter` (convolutions, matmuls; 2 FLOPs per "
    "multiply-add); **+elementwise** adds the pointwise, normalisation and pooling operations "
    "that counter ignores, which is where gating attention spends its time "
    "(`attnzoo.bench.profiling`). Latency is the median forward time in eval mode; it is noisy "
    "on a busy machine.")


def build_sections(result: Any, data: Any, run_config: dict, env: dict,
                   command: str) -> list[Section]:
    """The standard sections of the bench report (summary, plots, data, runs, environment)."""
    summary, runs = result.summary, result.runs
    headers, rows = result.table()
    per_seed: dict[str, list[float]] = {}
    histories: dict[str, list[list[dict]]] = {}
    for r in runs:
        per_seed.setdefault(r["attention"], []).append(r["test_acc"])
        histories.setdefault(r["attention"], []).append(r.get("history", []))
    secs = [Section("Summary", [
        Text(f"{run_config['model']} on {data.description}. {run_config['epochs']} epochs, "
             f"batch {run_config['batch_size']}, SGD (Nesterov 0.9) with a one-cycle schedule "
             f"peaking at lr {run_config['lr']}, weight decay {run_config['weight_decay']}; "
             f"seeds {', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}."),
        Table(headers, rows),
        Text(HOW_TO_READ),
    ])]
    figs = [Figure("accuracy.png", plot_accuracy(summary, per_seed),
                   "Test top-1 per attention (bars: mean, error bars: ±1 std, dots: seeds).")]
    if any(s.get("params") for s in summary):
        figs.append(Figure("acc_vs_params.png", plot_tradeoff(
            summary, "params", "parameters", "Top-1 vs parameters"), "Top-1 vs parameters."))
    if any(s.get("latency_ms") for s in summary):
        figs.append(Figure("acc_vs_latency.png", plot_tradeoff(
            summary, "latency_ms", "CPU latency, batch 1 (ms)", "Top-1 vs CPU latency"),
            "Top-1 vs CPU latency at batch 1."))
    figs.append(Figure("curves.png", plot_curves(histories),
                       "Test top-1 and training loss per epoch, mean over seeds."))
    secs.append(Section("Plots", figs))
    n = min(24, len(data.test))
    imgs = data.denormalise(data.test.images[:n])
    boxes = None if data.test.boxes is None else data.test.boxes[:n]
    data_blocks: list[Block] = [Text(data.description + ".")]
    if data.name == "digits":
        data_blocks.append(Text(
            "Each image is a 32×32 canvas holding one handwritten digit (8×8 from scikit-learn's "
            "`load_digits`, upscaled to 16×16) at a random position, among fragments cut from "
            "other digits of the same split. The class is the digit; the red box (shown here, "
            "never given to the network) is the digit's bounding box. Train and test use "
            "disjoint source digits. Generator: `attnzoo.bench.data.make_cluttered_digits`."))
    data_blocks.append(Figure("samples.png", plot_samples(imgs, data.test.labels[:n].tolist(),
                                                          data.classes, boxes),
                              "The first test images with their labels."))
    secs.append(Section("Data", data_blocks))
    run_rows = [[r["attention"], r["seed"], fmt_pct(r["test_acc"]), r["test_n"],
                 fmt_pct(r["train_acc"]), f"{r['train_loss']:.4f}",
                 f"{r.get('train_seconds', 0.0):.1f}",
                 r.get("resumed_from_epoch", 0) or ""] for r in runs]
    secs.append(Section("Runs", [Table(
        ["attention", "seed", "test top-1 %", "test images", "train top-1 %", "train loss",
         "train s", "resumed at epoch"], run_rows)]))
    env_rows = [[k, v] for k, v in env.items()]
    cfg_rows = [[k, v] for k, v in run_config.items()]
    secs.append(Section("Reproduce", [
        Text("The exact command:"), Code(command),
        Text(f"Wall time of this invocation: {result.wall_seconds:.1f} s"
             + (f" ({len(result.skipped)} finished runs were reused)." if result.skipped
                else ".")),
        Table(["setting", "value"], cfg_rows, "Configuration:"),
        Table(["software / hardware", "value"], env_rows, "Environment:"),
    ]))
    return secs
