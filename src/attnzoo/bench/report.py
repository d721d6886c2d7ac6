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
from collections.abc import Collection, Sequence
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
    "build_sections",
    "chance_level",
    "csv_columns",
    "fmt_diff",
    "fmt_pct",
    "how_to_read",
    "mean_ci",
    "near_chance",
    "plot_accuracy",
    "plot_confusion",
    "plot_curves",
    "plot_forest",
    "plot_samples",
    "plot_tradeoff",
    "pooled_confusions",
    "render_html",
    "render_markdown",
    "sample_per_class",
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
    atomic_write_text(
        path, json.dumps(payload, indent=2, default=_json_default, allow_nan=True) + "\n"
    )


def csv_columns(
    metric: str = "test_acc", extra: Sequence[str] = ("test_n", "train_acc")
) -> tuple[str, ...]:
    """The columns of results.csv for a task with primary ``metric`` and per-run ``extra``
    keys (the defaults are the classification task's)."""
    return (
        "row",
        "task",
        "attention",
        "seed",
        "n_seeds",
        "metric",
        metric,
        f"{metric}_std",
        "baseline",
        "diff_vs_baseline",
        "diff_low",
        "diff_high",
        "verdict",
        *extra,
        "train_loss",
        "params",
        "flops",
        "extra_flops",
        "latency_ms",
        "peak_mb",
        "train_seconds",
    )


def write_results_csv(
    path: str | os.PathLike,
    runs: Sequence[dict],
    summary: Sequence[dict],
    columns: Sequence[str] = csv_columns(),
) -> None:
    """One ``row=run`` line per attention × seed, then one ``row=summary`` line per attention."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
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
    """A paragraph of Markdown-ish text (``**bold**`` and ``code`` pass through to HTML);
    ``note`` highlights it (a warning the reader must not miss)."""

    text: str
    note: bool = False


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
    """A titled list of blocks; ``collapsed`` sections render closed (``<details>``) in HTML."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2
    collapsed: bool = False


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section], figures_dir: str = "figures") -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"{'#' * sec.level} {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Text):
                out += [("> " if b.note else "") + b.text, ""]
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
details{margin:.4em 0}summary{cursor:pointer}summary>h2,summary>h3{display:inline}
.note{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em}
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for sec in sections:
        lvl = min(max(sec.level, 2), 6)
        heading = f"<h{lvl}>{html.escape(sec.title)}</h{lvl}>"
        parts.append(f"<details><summary>{heading}</summary>" if sec.collapsed else heading)
        for b in sec.blocks:
            if isinstance(b, Text):
                lines = b.text.split("\n")
                if all(ln.startswith("- ") for ln in lines if ln.strip()):
                    items = "".join(f"<li>{_inline(ln[2:])}</li>" for ln in lines if ln.strip())
                    parts.append(f"<ul>{items}</ul>")
                else:
                    cls = ' class="note"' if b.note else ""
                    parts.append(f"<p{cls}>{_inline(b.text)}</p>")
            elif isinstance(b, Code):
                parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
            elif isinstance(b, Table):
                if b.caption:
                    parts.append(f"<p>{_inline(b.caption)}</p>")
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                    for row in b.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                alt = html.escape(b.caption or b.name)
                cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
                parts.append(
                    f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'
                )
        if sec.collapsed:
            parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    out_dir: str | os.PathLike,
    title: str,
    sections: Sequence[Section],
    extra_sections: Sequence[Section] = (),
) -> tuple[Path, Path]:
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
def count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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


def _name(label: str) -> str:
    """``"top-1 %"`` -> ``"top-1"`` (a metric label without its unit)."""
    return label.removesuffix("%").strip()


def plot_accuracy(
    summary: Sequence[dict],
    per_seed: dict[str, list[float]],
    *,
    metric: str = "test_acc",
    label: str = "top-1 %",
) -> bytes:
    """Bars of the mean ``metric`` with ±1 std error bars, and each seed as a dot."""
    plt = _plt()
    labels = [s["attention"] for s in summary]
    means = [100 * s[metric] for s in summary]
    stds = [100 * s[f"{metric}_std"] for s in summary]
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
    ax.set_ylabel(f"test {_name(label)} (%)")
    ax.set_title(f"{_name(label)} per attention: mean ± std over seeds (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_tradeoff(
    summary: Sequence[dict],
    key: str,
    xlabel: str,
    title: str,
    *,
    metric: str = "test_acc",
    label: str = "top-1 %",
) -> bytes:
    """Mean ``metric`` (± std) against a cost (``params``, ``latency_ms``...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s in summary:
        x = s.get(key)
        if x is None or (isinstance(x, float) and math.isnan(x)):
            continue
        ax.errorbar([x], [100 * s[metric]], yerr=[100 * s[f"{metric}_std"]], fmt="o", capsize=3)
        ax.annotate(
            s["attention"],
            (x, 100 * s[metric]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel(xlabel)
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_ylabel(f"test {_name(label)} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_curves(
    histories: dict[str, list[list[dict]]], *, metric: str = "test_acc", label: str = "top-1 %"
) -> bytes:
    """Per attention, mean over seeds per epoch: the test ``metric`` and the training loss
    (epochs without an evaluation are left out of the metric's curve)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for att, runs in histories.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        n = min(len(r) for r in runs)
        ep = [runs[0][i]["epoch"] for i in range(n)]
        scored = [i for i in range(n) if all(r[i].get(metric) is not None for r in runs)]
        acc = [100 * sum(r[i][metric] for r in runs) / len(runs) for i in scored]
        loss = [sum(r[i]["train_loss"] for r in runs) / len(runs) for i in range(n)]
        a1.plot([ep[i] for i in scored], acc, marker="o", ms=3, label=att)
        a2.plot(ep, loss, marker="o", ms=3, label=att)
    a1.set_xlabel("epoch")
    a1.set_ylabel(f"test {_name(label)} (%)")
    a1.set_title(f"Test {_name(label)} after each epoch (mean over seeds)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("training loss")
    a2.set_title("Training loss (mean over seeds)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=8, ncol=2)
    return _png(fig)


def plot_samples(
    images: Any, labels: Sequence[int], classes: Sequence[str], boxes: Any = None, ncols: int = 8
) -> bytes:
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
            ax.add_patch(
                plt.Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1
                )
            )
        ax.set_title(str(classes[int(labels[i])]), fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# the answer: chance level, confidence intervals, per-class accuracy, the forest plot
#: a top-1 within this many points of the chance level is flagged as "near chance"
NEAR_CHANCE_POINTS = 0.05


def chance_level(labels: Any, num_classes: int) -> dict[str, Any]:
    """What guessing scores on a test set with these labels: ``uniform`` (1 / classes),
    ``majority`` (always answering the most frequent class, ``majority_class``), and ``chance``,
    the larger of the two (the level a network must clearly beat)."""
    import torch

    counts = torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_classes)
    total = int(counts.sum())
    top = int(counts.argmax())
    majority = int(counts[top]) / total if total else float("nan")
    uniform = 1.0 / num_classes
    return {
        "uniform": uniform,
        "majority": majority,
        "majority_class": top,
        "chance": max(uniform, majority),
    }


def near_chance(mean: float, low: float, chance: float) -> bool:
    """True when a top-1 ``mean`` is below, at or within :data:`NEAR_CHANCE_POINTS` of
    ``chance``, or the lower end ``low`` of its 95 % CI (``nan`` with one seed) reaches it."""
    if mean is None or math.isnan(mean):
        return False
    return mean - chance < NEAR_CHANCE_POINTS or (not math.isnan(low) and low <= chance)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its Student-t interval (``nan`` ends for one value)."""
    from attnzoo.bench.stats import summarize, t_quantile

    st = summarize(values)
    if st.n < 2:
        return st.mean, float("nan"), float("nan")
    half = t_quantile(st.n - 1, confidence) * st.std / math.sqrt(st.n)
    return st.mean, st.mean - half, st.mean + half


def pooled_confusions(runs: Sequence[dict], num_classes: int) -> dict[str, Any]:
    """Per attention, the test confusion matrices ``[true, predicted]`` summed over its seeds
    (a ``(K, K)`` int64 tensor). Runs without one (results written by older versions) are
    left out."""
    import torch

    out: dict[str, Any] = {}
    for r in runs:
        m = r.get("confusion")
        if m is None:
            continue
        t = torch.as_tensor(m, dtype=torch.int64)
        if tuple(t.shape) == (num_classes, num_classes):
            out[r["attention"]] = out[r["attention"]] + t if r["attention"] in out else t
    return out


def _per_class_accuracy(confusion: Any) -> Any:
    m = confusion.double()
    return m.diagonal() / m.sum(1).clamp_min(1)


def sample_per_class(labels: Any, n: int, *, seed: int = 0) -> list[int]:
    """``n`` indices drawn from every class in turn, sorted by class.

    Round robin over the classes (in an order drawn from ``seed``), taking from each a random
    image not taken yet: every class is shown when ``n`` >= the number of classes, whatever the
    order of the images (e.g. a folder sorted by class). Deterministic for a given ``seed``.
    """
    import torch

    labels = torch.as_tensor(labels).long().flatten()
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    pools = [
        torch.nonzero(labels == c).flatten()
        for c in classes[torch.randperm(len(classes), generator=gen)]
    ]
    orders = [p[torch.randperm(len(p), generator=gen)].tolist() for p in pools]
    n = min(n, len(labels))
    picked: list[int] = []
    for k in range(max((len(p) for p in orders), default=0)):
        picked += [p[k] for p in orders if k < len(p)][: n - len(picked)]
        if len(picked) >= n:
            break
    return sorted(picked, key=lambda i: (int(labels[i]), i))


def _whisker(ax: Any, y: float, m: float, lo: float, hi: float, color: str) -> None:
    err = None if math.isnan(lo) else [[m - lo], [hi - m]]
    ax.errorbar([m], [y], xerr=err, fmt="o", color=color, ecolor=color, capsize=3, ms=5)


def plot_forest(
    summary: Sequence[dict],
    acc_ci: dict[str, tuple[float, float, float]],
    baseline: str | None,
    reference: float | None = None,
    *,
    flagged: Collection[str] = (),
    label: str = "top-1 %",
    reference_name: str = "chance",
    diffs: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The answer in one figure: the metric (``label``) per attention with its 95 % CI
    (``acc_ci``: label -> (mean, low, high)) and a ``reference`` level (dashed; the ``flagged``
    attentions in orange), then the paired differences to ``baseline`` with their 95 % CIs (the
    metric, and each ``(key, name)`` of ``diffs`` whose ``{key}_diff`` the summary has), one row
    per attention."""
    plt = _plt()
    name = _name(label)
    panels: list[tuple[str, tuple[str, str, str] | None]] = [(f"{label} (mean, 95 % CI)", None)]
    if baseline is not None:
        panels.append(
            (f"Δ {name} vs {baseline} (points)", ("diff_vs_baseline", "diff_low", "diff_high"))
        )
        for key, name in diffs:
            if any(f"{key}_diff" in s for s in summary):
                panels.append(
                    (
                        f"Δ {name} vs {baseline} (points)",
                        (f"{key}_diff", f"{key}_diff_low", f"{key}_diff_high"),
                    )
                )
    n = len(summary)
    fig, axes = plt.subplots(
        1,
        len(panels),
        sharey=True,
        squeeze=False,
        figsize=(min(11.0, 2.8 * len(panels) + 1.6), 0.38 * n + 1.0),
    )
    ys = list(range(n))[::-1]  # the first attention at the top
    for ax, (title, keys) in zip(axes[0], panels):
        xs = [0.0] if keys is not None else [] if reference is None else [100 * reference]
        for y, s in zip(ys, summary):
            if keys is None:
                m, lo, hi = acc_ci[s["attention"]]
                color = "#e6550d" if s["attention"] in flagged else "#08519c"
            elif keys[0] in s:
                m, lo, hi = (s[k] for k in keys)
                undecided = math.isnan(lo) or lo <= 0.0 <= hi
                color = "#777777" if undecided else ("#1a9850" if m > 0 else "#d73027")
            else:
                if s["attention"] == baseline:
                    ax.text(0, y, "baseline", ha="center", va="center", fontsize=8, color="#555555")
                continue
            _whisker(ax, y, 100 * m, 100 * lo, 100 * hi, color)
            xs += [100 * v for v in (m, lo, hi) if not math.isnan(v)]
        xs = xs or [0.0]
        pad = max(1.0, 0.08 * (max(xs) - min(xs)))
        low, high = min(xs) - pad, max(xs) + pad
        if keys is None:  # an accuracy lies in [0, 100] whatever a wide CI says
            low, high = max(low, -pad), min(high, 100 + pad)
        ax.set_xlim(low, high)
        if keys is None and reference is not None:
            ax.axvline(100 * reference, color="#e6550d", ls="--", lw=1)
            ax.set_xlabel(f"dashed: {reference_name} {100 * reference:.1f} %", fontsize=8)
        elif keys is not None:
            ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(ys, [s["attention"] for s in summary])
    axes[0][0].set_ylim(-0.6, n - 0.4)
    fig.tight_layout()
    return _png(fig)


def plot_confusion(confusions: dict[str, Any], classes: Sequence[str]) -> bytes:
    """One confusion matrix per attention (rows: true class, columns: predicted), each row in
    percent of the class's test images; cells are annotated up to 10 classes, and the axes name
    the classes up to 20."""
    plt = _plt()
    k, labels = len(classes), list(confusions)
    ncols = min(len(labels), 4)
    nrows = math.ceil(len(labels) / ncols)
    cell = 2.3 if k <= 10 else 3.0
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(cell * ncols + 0.4, cell * nrows + 0.3), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    names = [str(c)[:10] for c in classes]
    for ax, label in zip(axes.flat, labels):
        m = confusions[label].double()
        pct = 100 * m / m.sum(1, keepdim=True).clamp_min(1)
        ax.axis("on")
        ax.imshow(pct.numpy(), cmap="Blues", vmin=0, vmax=100)
        ax.set_title(
            f"{label} ({100 * float(m.diagonal().sum() / m.sum().clamp_min(1)):.1f} %)", fontsize=9
        )
        if k <= 20:
            ax.set_xticks(range(k), names, rotation=90, fontsize=7)
            ax.set_yticks(range(k), names, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if k <= 10:
            for i in range(k):
                for j in range(k):
                    v = float(pct[i, j])
                    ax.text(
                        j,
                        i,
                        f"{v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v > 50 else "black",
                    )
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# the bench report
def how_to_read(baseline: str | None, label: str = "top-1 %", task_lines: str = "") -> str:
    """The "how to read the numbers" notes: the metric (``label``), the paired Δ and its CI,
    ``task_lines`` (the task's own bullets), the test set, and the cost columns."""
    base, name = baseline or "the baseline", _name(label)
    lines = [
        f"- **{name}** is the test score after the last epoch, mean ± sample standard deviation "
        "over the seeds (the figure shows the mean with its 95 % CI). Each seed fixes the initial "
        "weights and the order of the training batches; every attention is trained with the "
        "same seeds, so seed *s* of every attention saw the same batches in the same order.",
        f"- **Δ vs {base}** is the mean over seeds of the paired difference {name}(attention) − "
        f"{name}({base}), in percentage points, with its 95 % confidence interval from Student's "
        "t distribution with n−1 degrees of freedom. The baseline is `none` when it is among "
        "the attentions, else the one named by `--baseline` (API: `baseline=`); without either, "
        "no Δ is computed.",
        "- **no detectable effect**: the interval contains 0. With these seeds and this data the "
        "module cannot be told apart from the baseline; it does not mean the effect is exactly "
        "0. More seeds narrow the interval.",
        *([task_lines.strip("\n")] if task_lines.strip() else []),
        "- The test images are never used for choosing anything (no early stopping, no "
        "best-epoch pick); the curves are shown for information only.",
        "- **params / MFLOPs / latency** are for the whole network and one image on this "
        "machine's CPU. MFLOPs are counted by `torch.utils.flop_counter` (convolutions, matmuls; "
        "2 FLOPs per multiply-add); **+elementwise** adds the pointwise, normalisation and "
        "pooling operations that counter ignores, which is where gating attention spends its "
        "time (`attnzoo.bench.profiling`). Latency is the median forward time in eval mode; it "
        "is noisy on a busy machine.",
    ]
    return "\n".join(lines)


def _answer_section(
    result: Any, data: Any, run_config: dict, per_seed: dict[str, list[float]], part: Any
) -> Section:
    """Setup, forest plot, the task's notes, the results table (flags marked), the baseline
    note."""
    summary, baseline = result.summary, result.baseline
    label = result.metric_label
    ci = {lab: mean_ci(v) for lab, v in per_seed.items()}
    setup = part.setup or f"{run_config.get('model', 'the model')} on {data.description}."
    blocks: list[Block] = [Text(setup)]
    caption = f"Left: test {_name(label)} per attention, mean over seeds with its 95 % CI"
    if part.reference is not None:
        caption += f"; dashed: {part.reference_label or 'the reference level'}"
    caption += part.forest_note + "."
    names = [n for k, n in part.diffs if any(f"{k}_diff" in s for s in summary)]
    if baseline is not None:
        caption += (
            f" Right: the paired difference to `{baseline}` in percentage points with "
            "its 95 % CI (green: better, red: worse, grey: no detectable effect)"
            + (f", for {', '.join([_name(label), *names[:-1]])} and {names[-1]}." if names else ".")
        )
    blocks.append(
        Figure(
            "forest.png",
            plot_forest(
                summary,
                ci,
                baseline,
                part.reference,
                flagged=part.flagged,
                label=label,
                reference_name=part.reference_label.removeprefix("the "),
                diffs=part.diffs,
            ),
            caption,
        )
    )
    blocks += part.notes
    headers, rows = result.table()
    rows = [list(r) for r in rows]
    for row, s in zip(rows, summary):
        if s["attention"] in part.flagged:
            row[1] = f"{row[1]} ({part.flagged[s['attention']]})"
    blocks.append(Table(headers, rows))
    if baseline is None:
        blocks.append(
            Text(
                "**No baseline**: `none` is not among the attentions and no `--baseline` was "
                "given, "
                "so no differences (Δ) are computed. Add `none` to `--attention`, or name one of "
                "the attentions with `--baseline NAME` (API: `baseline=`).",
                note=True,
            )
        )
    return Section("Result", blocks)


def build_sections(
    result: Any, data: Any, run_config: dict, env: dict, command: str, part: Any
) -> list[Section]:
    """The sections of the bench report, the answer first: the result (forest plot, the
    task's notes, table), how to read it (collapsed), the task's sections (``part``, an
    :class:`~attnzoo.bench.tasks.base.TaskReport`), then collapsed: more plots, the runs, how
    to reproduce. ``result`` is a :class:`~attnzoo.bench.engine.BenchResult`."""
    summary, runs = result.summary, result.runs
    metric, label = result.metric, result.metric_label
    per_seed: dict[str, list[float]] = {}
    histories: dict[str, list[list[dict]]] = {}
    for r in runs:
        per_seed.setdefault(r["attention"], []).append(r[metric])
        histories.setdefault(r["attention"], []).append(r.get("history", []))
    secs = [
        _answer_section(result, data, run_config, per_seed, part),
        Section(
            "How to read the numbers",
            [Text(how_to_read(result.baseline, label, part.how_to_read))],
            collapsed=True,
        ),
        *part.sections,
    ]
    name = _name(label)
    kw = {"metric": metric, "label": label}
    figs: list[Block] = [
        Figure(
            "accuracy.png",
            plot_accuracy(summary, per_seed, **kw),
            f"Test {name} per attention (bars: mean, error bars: ±1 std, dots: seeds).",
        )
    ]
    if any(s.get("params") for s in summary):
        figs.append(
            Figure(
                "acc_vs_params.png",
                plot_tradeoff(summary, "params", "parameters", f"{name} vs parameters", **kw),
                f"{name} vs parameters.",
            )
        )
    if any(s.get("latency_ms") for s in summary):
        figs.append(
            Figure(
                "acc_vs_latency.png",
                plot_tradeoff(
                    summary,
                    "latency_ms",
                    "CPU latency, batch 1 (ms)",
                    f"{name} vs CPU latency",
                    **kw,
                ),
                f"{name} vs CPU latency at batch 1.",
            )
        )
    figs.append(
        Figure(
            "curves.png",
            plot_curves(histories, **kw),
            f"Test {name} and training loss per epoch, mean over seeds.",
        )
    )
    secs.append(Section("More plots", figs, collapsed=True))
    extra = [(h, k) for h, k in part.run_columns if any(k in r for r in runs)]
    run_rows = [
        [
            r["attention"],
            r["seed"],
            fmt_pct(r[metric]),
            *(_cell(r.get(k)) for _, k in extra),
            "" if r.get("train_loss") is None else f"{r['train_loss']:.4f}",
            f"{r.get('train_seconds', 0.0):.1f}",
            r.get("resumed_from_epoch", 0) or "",
        ]
        for r in runs
    ]
    secs.append(
        Section(
            "Runs",
            [
                Table(
                    [
                        "attention",
                        "seed",
                        f"test {label}",
                        *(h for h, _ in extra),
                        "train loss",
                        "train s",
                        "resumed at epoch",
                    ],
                    run_rows,
                )
            ],
            collapsed=True,
        )
    )
    env_rows = [[k, v] for k, v in env.items()]
    cfg_rows = [[k, v] for k, v in run_config.items()]
    secs.append(
        Section(
            "Reproduce",
            [
                Text("The exact command:"),
                Code(command),
                Text(
                    f"Wall time of this invocation: {result.wall_seconds:.1f} s"
                    + (
                        f" ({len(result.skipped)} finished runs were reused)."
                        if result.skipped
                        else "."
                    )
                ),
                Table(["setting", "value"], cfg_rows, "Configuration:"),
                Table(["software / hardware", "value"], env_rows, "Environment:"),
            ],
            collapsed=True,
        )
    )
    return secs


def _cell(v: Any) -> str:
    """A run-table cell: fractions (floats) in percent, counts as they are."""
    if v is None:
        return ""
    return fmt_pct(v) if isinstance(v, float) else str(v)
