"""The comparison report, computed from ``results.json`` alone.

:func:`write_report` writes into the comparison folder

* ``summary.json``: per method the statistics below, as numbers (accuracies as fractions);
* ``report.md``: the settings, the main table, the fit/gap table, the learned G per layer,
  links to the plots and, when the comparison wrote a ``config.yaml``, that config (the
  settings are read from it; from the first run's record for folders made before it);
* ``plots/*.png`` (when matplotlib is installed): learning curves (``accuracy.png``), the
  paired differences to the baseline, one point per seed (``paired_differences.png``), the
  learned G of the first, middle and last scaled layer at each refresh (paper Fig. 4/5), the
  average kernel magnitude matrices per method (Fig. 6), and Δ against k when the results hold
  several k (Fig. 8).  Heatmaps are means over seeds on one colour scale per figure.

Statistics, per method over its n seeds (x_s = final test accuracy of seed s):
mean x̄; sample standard deviation s = sqrt(Σ(x_s − x̄)²/(n − 1)); 95 % Student-t interval
x̄ ± t_{0.975, n−1}·s/√n.  Paired difference to ``baseline`` over the seeds both have:
d_s = x_s − b_s, then the same mean and t-interval of d (the interval the tables and plots
show: pairing removes the seed-to-seed variation the methods share).  Fit: f_s = accuracy of
the final model on the un-augmented training images in eval mode (``train_eval_acc``), gap
g_s = f_s − x_s, and the running gap r_s − x_s with r_s the last epoch's running training
accuracy (augmented batches, training mode); each with the same mean and t-interval.  Time
ratio: mean training seconds over the baseline's.  With n = 1 the spread and intervals are
undefined (``null``, shown "–").
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import CONFIG_FILE, dump_yaml, load_config_file

__all__ = [
    "BASELINE",
    "chosen_layers",
    "gap_table",
    "kernel_picture",
    "load_results",
    "paired_differences",
    "plot_accuracy_vs_k",
    "plot_kernel_magnitude",
    "plot_learning_curves",
    "plot_paired_differences",
    "plot_scalings",
    "summarize",
    "summarize_records",
    "t_quantile",
    "table",
    "write_report",
]

#: The method paired differences and time ratios are taken against.
BASELINE = "baseline"


# Two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30.
_T975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836,
    2.446911851, 2.364624252, 2.306004135, 2.262157163, 2.228138852,
    2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546,
    2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447,
    2.079613845, 2.073873068, 2.068657610, 2.063898562, 2.059538553,
    2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile(df: int) -> float:
    """``t_{0.975, df}``: the two-sided 95 % quantile of Student's t with ``df`` ≥ 1.

    scipy when installed; otherwise a table for df ≤ 30 and, above, the Cornish-Fisher
    expansion of t in powers of 1/df around the normal quantile (error < 1e-6 for df > 30).
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: df must be an int >= 1, got {df!r}")
    try:
        from scipy.stats import t
    except ImportError:
        t = None
    if t is not None:
        return float(t.ppf(0.975, df))
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``n``, ``mean``, ``std`` (n − 1 in the denominator) and the 95 % t-interval ``ci``.

    ``std`` and ``ci`` are ``None`` for a single value; an empty sequence gives ``n = 0`` and
    ``mean = None``.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci": None}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci": None}
    std = float(x.std(ddof=1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half]}


def _methods_in_order(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["method"], None)
    return list(seen)


def _by_seed(records: list[dict[str, Any]], method: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in records if r["method"] == method}


def paired_differences(
    records: list[dict[str, Any]], method: str, baseline: str = BASELINE
) -> dict[int, float]:
    """``{s: d_s}`` with ``d_s = test_acc(method, s) − test_acc(baseline, s)``, in seed order.

    Only the seeds both methods have are paired; an empty dict when they share none.
    """
    runs, base = _by_seed(records, method), _by_seed(records, baseline)
    return {s: runs[s]["test_acc"] - base[s]["test_acc"] for s in sorted(set(runs) & set(base))}


def _optional(values: list[float | None]) -> dict[str, Any] | None:
    kept = [v for v in values if v is not None]
    return summarize(kept) if kept else None


def _seconds(record: dict[str, Any]) -> float:
    """What a run cost in training time: its training passes, plus any search stage."""
    return record["train_seconds"] + record.get("search_seconds", 0.0)


def summarize_records(records: list[dict[str, Any]], reference: str = BASELINE) -> dict[str, Any]:
    """Per method, in first-seen order: the statistics of the module docstring.

    ``reference`` is the method every other is paired against (the plain baseline unless a
    comparison asks otherwise, e.g. a structure against its Lemma-1 scaling).

    Returns ``{"baseline": reference or None, "methods": [row, ...]}``; a row holds
    ``method``, ``seeds``, ``k``, ``test_acc`` and ``val_acc`` (:func:`summarize` dicts),
    ``paired_diff`` (of d_s against the baseline, ``None`` without one) and
    ``paired_by_seed`` (``[{"seed", "diff"}, ...]``), ``train_eval_acc`` and ``gap`` (``None``
    when no run recorded ``train_eval_acc``), ``last_train_acc`` and ``running_gap``,
    ``train_seconds`` (with a method's search stage, e.g. RepOpt's hyper-search, included),
    ``time_ratio``, ``params`` and ``params_deployed``.
    """
    base = _by_seed(records, reference)
    base_time = summarize([_seconds(r) for r in base.values()])["mean"]
    rows = []
    for method in _methods_in_order(records):
        runs = _by_seed(records, method)
        first = next(iter(runs.values()))
        time = summarize([_seconds(r) for r in runs.values()])["mean"]
        diffs = (
            paired_differences(records, method, reference) if base and method != reference else None
        )
        tests = [r["test_acc"] for r in runs.values()]
        fit = [r.get("train_eval_acc") for r in runs.values()]
        last = [r["history"][-1]["train_acc"] if r["history"] else None for r in runs.values()]
        gap = [None if f is None else f - x for f, x in zip(fit, tests, strict=True)]
        running = [None if a is None else a - x for a, x in zip(last, tests, strict=True)]
        rows.append(
            {
                "method": method,
                "seeds": sorted(runs),
                "k": first.get("k"),
                "test_acc": summarize(tests),
                "val_acc": _optional([r.get("val_acc") for r in runs.values()]),
                "paired_diff": summarize(list(diffs.values())) if diffs is not None else None,
                "paired_by_seed": (
                    [{"seed": s, "diff": d} for s, d in diffs.items()] if diffs else []
                ),
                "train_eval_acc": _optional(fit),
                "gap": _optional(gap),
                "last_train_acc": _optional(last),
                "running_gap": _optional(running),
                "train_seconds": time,
                "time_ratio": time / base_time if base_time else None,
                "params": first["params"],
                "params_deployed": first.get("params_deployed", first["params"]),
            }
        )
    return {"baseline": reference if base else None, "methods": rows}


# ---- markdown ----------------------------------------------------------------------------
def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    return "–" if ci is None else f"[{_pct(ci[0], signed)}, {_pct(ci[1], signed)}]"


def _mean_ci(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if stat is None:
        return "–"
    ci = "" if stat["ci"] is None else f" {_interval(stat['ci'], signed)}"
    return f"{_pct(stat['mean'], signed)}{ci}"


def _params(n: int, deployed: int) -> str:
    return f"{n:,}" if n == deployed else f"{n:,} → {deployed:,}"


def table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (accuracies in %).

    Per method: seeds, test accuracy (mean ± std over seeds), the paired Δ against the
    baseline with its 95 % t-interval, time and parameters.  No unpaired interval is shown:
    comparisons between methods are read from the paired one.
    """
    reference = summary.get("baseline") or BASELINE
    lines = [
        f"| method | seeds | test acc % (mean ± std) | Δ vs {reference} (paired) "
        f"| 95% CI of Δ (paired t) | train s | time × {reference} | params (train → deployed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["methods"]:
        acc, diff = row["test_acc"], row["paired_diff"]
        std = "" if acc["std"] is None else f" ± {_pct(acc['std'])}"
        ratio = "–" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        lines.append(
            f"| {row['method']} | {acc['n']} | {_pct(acc['mean'])}{std} | "
            f"{_pct(diff['mean'], True) if diff else '–'} | "
            f"{_interval(diff['ci'], True) if diff else '–'} | {row['train_seconds']:.1f} | "
            f"{ratio} | {_params(row['params'], row['params_deployed'])} |"
        )
    return "\n".join(lines)


def gap_table(summary: dict[str, Any]) -> str:
    """Fit and generalisation per method as a markdown table (accuracies in %).

    Columns: the final model's accuracy on the un-augmented training images in eval mode
    (``train_eval_acc``), the test accuracy, their gap per run (mean and 95 % t-interval over
    seeds), the last epoch's running training accuracy and its gap to test.  "–" where the
    runs did not record ``train_eval_acc`` (records written before it existed).
    """
    lines = [
        "| method | seeds | fit acc % (train images, eval mode) | test acc % "
        "| fit − test (95% CI) | running train acc %, last epoch | running − test (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["methods"]:
        fit, last = row["train_eval_acc"], row["last_train_acc"]
        lines.append(
            f"| {row['method']} | {row['test_acc']['n']} | "
            f"{_pct(fit['mean']) if fit else '–'} | {_pct(row['test_acc']['mean'])} | "
            f"{_mean_ci(row['gap'], True)} | {_pct(last['mean']) if last else '–'} | "
            f"{_mean_ci(row['running_gap'], True)} |"
        )
    return "\n".join(lines)


def _matrix_text(g: list) -> str:
    rows = g if isinstance(g[0], list) else [g]
    return "\n".join("  ".join(f"{v:5.2f}" for v in row) for row in rows)


def scalings_text(records: list[dict[str, Any]]) -> str:
    """The final G per layer of each scaling method, mean over its seeds, as text blocks.

    G of shape ``(c_out, *K)`` or ``(c_out, c_in/groups, *K)`` is first averaged over the
    channel dimensions (:func:`kernel_picture`); layers without a picture are left out.
    """
    blocks = []
    for method in _methods_in_order(records):
        runs = [r for r in _by_seed(records, method).values() if r.get("scalings")]
        if not runs:
            continue
        lines = []
        for layer in runs[0]["scalings"]["final"]:
            pictures = []
            for r in runs:
                g = r["scalings"]["final"].get(layer)
                pictures.append(kernel_picture(g, _kernel_ndim(r, layer)) if g else None)
            if any(p is None for p in pictures) or len({p.shape for p in pictures}) != 1:
                continue
            mean = np.mean(pictures, axis=0)
            lines.append(f"`{layer}`\n```\n{_matrix_text(mean.tolist())}\n```")
        if lines:
            seeds = _seed_count([r["seed"] for r in runs])
            blocks += [f"**{method}**, final G per layer, mean over {seeds}:\n", *lines]
    return "\n".join(blocks)


def _settings_text(records: list[dict[str, Any]], config: dict[str, Any] | None) -> str:
    c = config if config is not None else records[0]["config"]
    d, m, o = c["data"], c["model"], c["optim"]
    return (
        f"data {d['dataset']} (subset {d['subset'] or 'all'}, pad to {d['pad_to'] or '–'}, "
        f"val fraction {d['val_fraction']}); model {m['name']} width {m['width']}"
        f"{', last pool dropped' if m['drop_last_pool'] else ''}; {o['name']} lr {o['lr']} "
        f"momentum {o['momentum']} wd {o['weight_decay']}, {o['epochs']} epochs, batch "
        f"{o['batch_size']}, warm-up {o['warmup_epochs']} epochs, label smoothing "
        f"{o['label_smoothing']}; SGS k {c['sgs']['k']}, measure {c['sgs']['measure']}, "
        f"mode {c['sgs']['mode']}, refresh after {c['sgs']['refresh_warmup']} then every "
        f"{c['sgs']['refresh_every']} epochs from {c['sgs']['refresh_batches']} batches; "
        f"device {records[0].get('device', '?')}"
    )


# ---- plots -------------------------------------------------------------------------------
def chosen_layers(names: Sequence[str], count: int = 3) -> list[str]:
    """First, middle and last of ``names`` (fewer if there are fewer), as in paper Fig. 4."""
    names = list(names)
    if len(names) <= count:
        return names
    idx = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)})
    return [names[i] for i in idx]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def kernel_picture(g: Any, kernel_ndim: int | None = None) -> np.ndarray | None:
    """The 2-D array a heatmap shows for a scaling or kernel-magnitude ``g``.

    ``g`` may have the kernel's shape ``K``, ``(c_out, *K)`` or the weight's shape
    ``(c_out, c_in/groups, *K)`` (the three shapes ``SpatialGradientScaling.set_scaling``
    accepts); the leading channel dimensions are averaged: P = mean_{o,i} g[o, i].
    ``kernel_ndim`` is ``len(K)``; ``None`` takes 2 when ``g`` has two or more dimensions,
    else 1 (so a 1-D kernel given per channel needs ``kernel_ndim=1``).  Returns ``(kh, kw)``
    float64 for a 2-D kernel, ``(1, k)`` for a 1-D one, and ``None`` for what is not pictured:
    3-D kernels, or a ``g`` with fewer than ``kernel_ndim`` or more than ``kernel_ndim + 2``
    dimensions.
    """
    a = np.asarray(g, dtype=np.float64)
    if kernel_ndim is None:
        kernel_ndim = 2 if a.ndim >= 2 else 1
    if kernel_ndim not in (1, 2) or not kernel_ndim <= a.ndim <= kernel_ndim + 2:
        return None
    lead = a.ndim - kernel_ndim
    if lead:
        a = a.mean(axis=tuple(range(lead)))
    return a[None, :] if kernel_ndim == 1 else a


def _kernel_ndim(record: dict[str, Any], layer: str) -> int | None:
    """``len(K)`` of ``layer`` from the record's kernel magnitudes (shape ``K``), if there."""
    mag = (record.get("kernel_magnitude") or {}).get(layer)
    return None if mag is None else int(np.asarray(mag).ndim)


def _seed_count(seeds: Sequence[int]) -> str:
    n = len(set(seeds))
    return "1 seed" if n == 1 else f"{n} seeds"


def _heatmap(ax, a: np.ndarray, vmin: float, vmax: float):
    image = ax.imshow(a, cmap="viridis", vmin=vmin, vmax=vmax)
    mid = (vmin + vmax) / 2
    for (i, j), v in np.ndenumerate(a):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if v > mid else "white")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _heatmap_grid(
    cells: list[list[np.ndarray]],
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    path: Path,
):
    """A figure of heatmaps on one colour scale: row labels at the left, column titles on top."""
    values = np.concatenate([a.ravel() for row in cells for a in row])
    vmin, vmax = float(values.min()), float(values.max())
    if vmax == vmin:  # a constant picture still gets a valid scale
        vmin, vmax = vmin - 0.5, vmax + 0.5
    width = 1.8 * len(col_labels) + 1.6
    fig = _new_figure(width, 1.7 * len(row_labels) + 1.2)
    axes = fig.subplots(len(row_labels), len(col_labels), squeeze=False)
    image = None
    for i, row in enumerate(cells):
        for j, a in enumerate(row):
            image = _heatmap(axes[i, j], a, vmin, vmax)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
    for j, label in enumerate(col_labels):
        axes[0, j].set_title(label, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(_wrap(title, width), fontsize=9)
    fig.savefig(path, dpi=110)
    return fig


def _wrap(text: str, inches: float, fontsize: float = 9) -> str:
    """``text`` broken into lines that fit ``inches`` at ``fontsize`` (~0.6 em per character)."""
    return textwrap.fill(text, max(20, int(inches * 72 / (0.6 * fontsize))))


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _epoch_stats(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, ...]:
    """Epochs (counted from 1) where every run has ``key``, and the mean and std there."""
    epochs = min(len(r["history"]) for r in runs)
    xs, means, stds = [], [], []
    for e in range(epochs):
        values = [r["history"][e].get(key) for r in runs]
        if any(v is None for v in values):
            continue
        xs.append(e + 1)
        means.append(float(np.mean(values)))
        stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return np.array(xs), np.array(means), np.array(stds)


def plot_learning_curves(
    records: list[dict[str, Any]], path: str | Path, methods: Sequence[str] | None = None
):
    """Training accuracy, test accuracy and training loss per epoch; returns the Figure.

    One line per method (``methods``, default all in first-seen order): the mean over its
    seeds, with a band of ± one sample standard deviation over seeds.  Training accuracy and
    loss are the running values over each epoch's augmented batches in training mode; the
    final accuracy on the un-augmented training images in eval mode (``train_eval_acc``) is
    marked at the last epoch.  Test accuracy is drawn only at the epochs where every seed was
    evaluated (``test_acc`` not ``None``), never as zeros.  The x axis counts epochs trained.
    """
    from matplotlib.ticker import MaxNLocator

    methods = list(methods) if methods is not None else _methods_in_order(records)
    fig = _new_figure(14, 4.2)
    ax_train, ax_test, ax_loss = fig.subplots(1, 3)
    counts = []
    for method in methods:
        runs = list(_by_seed(records, method).values())
        if not runs:
            raise ValueError(f"plot_learning_curves: no runs of method {method!r}")
        counts.append(len(runs))
        color = None
        for ax, key, scale in (
            (ax_train, "train_acc", 100.0),
            (ax_test, "test_acc", 100.0),
            (ax_loss, "train_loss", 1.0),
        ):
            x, mean, std = _epoch_stats(runs, key)
            if not x.size:
                continue
            (line,) = ax.plot(x, scale * mean, marker="o", ms=3, color=color, label=method)
            color = line.get_color()
            ax.fill_between(x, scale * (mean - std), scale * (mean + std), color=color, alpha=0.2)
        fit = [r.get("train_eval_acc") for r in runs]
        if all(f is not None for f in fit):
            last = min(len(r["history"]) for r in runs)
            mean_fit = 100 * float(np.mean(fit))
            ax_train.plot([last], [mean_fit], marker="x", ms=8, mew=2, color=color, ls="none")
    titles = (
        "Training accuracy (running; × final, un-augmented, eval mode)",
        "Test accuracy (epochs where evaluated)",
        "Training loss (running)",
    )
    ylabels = ("training accuracy %", "test accuracy %", "training loss")
    for ax, title, ylabel in zip((ax_train, ax_test, ax_loss), titles, ylabels, strict=True):
        ax.set_xlabel("epochs trained")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_test.legend(fontsize=8)
    n = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
    fig.suptitle(f"Learning curves: mean over {n} seeds, band ± 1 std over seeds", fontsize=9)
    fig.savefig(path, dpi=110)
    return fig


def plot_paired_differences(
    records: list[dict[str, Any]],
    path: str | Path,
    methods: Sequence[str] | None = None,
    baseline: str = BASELINE,
):
    """Δ test accuracy against ``baseline``, one point per seed, per method; returns the Figure.

    For each method (``methods``, default every other method with a seed in common with
    ``baseline``): the per-seed differences d_s (coloured by seed, the same colour for a seed
    in every column), and beside them their mean with the 95 % Student-t interval of
    :func:`summarize`.  ``None`` (nothing drawn) when no method shares a seed with the
    baseline.

    Raises:
        ValueError: a method in ``methods`` has no run, or shares no seed with ``baseline``.
    """
    if methods is None:
        methods = [
            m
            for m in _methods_in_order(records)
            if m != baseline and paired_differences(records, m, baseline)
        ]
        if not methods:
            return None
    diffs = {}
    for m in methods:
        diffs[m] = paired_differences(records, m, baseline)
        if not diffs[m]:
            raise ValueError(
                f"plot_paired_differences: method {m!r} shares no seed with {baseline!r}"
            )
    seeds = sorted({s for d in diffs.values() for s in d})
    colors = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    offsets = {s: -0.3 + 0.3 * i / max(1, len(seeds) - 1) for i, s in enumerate(seeds)}
    width = max(4.5, 1.2 * len(methods) + 2.5)
    fig = _new_figure(width, 4.2)
    ax = fig.subplots()
    labelled: set[int] = set()
    for i, m in enumerate(methods):
        for s, d in diffs[m].items():
            label = None if s in labelled else f"seed {s}"
            labelled.add(s)
            ax.plot(i + offsets[s], 100 * d, "o", ms=5, color=colors[s], label=label)
        stat = summarize(list(diffs[m].values()))
        err = None
        if stat["ci"] is not None:
            err = [[100 * (stat["mean"] - stat["ci"][0])], [100 * (stat["ci"][1] - stat["mean"])]]
        label = "mean, 95% t-interval" if i == 0 else None
        ax.errorbar(i + 0.2, 100 * stat["mean"], yerr=err, fmt="D", color="black", ms=6,
                    capsize=4, label=label)  # fmt: skip
    ax.axhline(0.0, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(methods)))
    tilt = len(methods) > 3
    ax.set_xticklabels(methods, rotation=20 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=8)  # fmt: skip
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel(f"Δ test accuracy vs {baseline} (points)")
    title = f"Paired by seed: one point per seed ({_seed_count(seeds)}), mean and 95% t-interval"
    ax.set_title(_wrap(title, width - 1.2), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if len(seeds) <= 12:
        ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    return fig


def plot_scalings(records: list[dict[str, Any]], method: str, path: str | Path):
    """G of ``method`` at each refresh, mean over its seeds, one colour scale; the Figure.

    Rows: the first, middle and last scaled layer; columns: the refreshes every seed has
    (at most six, evenly chosen), or the fixed G of a method that never refreshes.  Each cell
    is the mean over seeds of :func:`kernel_picture` of G.  ``None`` when the method has no
    picturable scaling.
    """
    runs = {s: r for s, r in _by_seed(records, method).items() if r.get("scalings")}
    if not runs:
        return None
    first = runs[min(runs)]
    histories = [{h["epoch"]: h["layers"] for h in r["scalings"]["history"]} for r in runs.values()]
    epochs = sorted(set.intersection(*(set(h) for h in histories)))
    if epochs:
        if len(epochs) > 6:
            epochs = [epochs[i] for i in sorted({round(i * (len(epochs) - 1) / 5)
                                                 for i in range(6)})]  # fmt: skip
        snapshots = [(f"epoch {e}", [h[e] for h in histories]) for e in epochs]
    else:
        snapshots = [("fixed", [r["scalings"]["final"] for r in runs.values()])]

    def mean_picture(layer: str, per_seed: list[dict[str, Any]]) -> np.ndarray | None:
        pictures = []
        for record, layers in zip(runs.values(), per_seed, strict=True):
            if not layers.get(layer):
                return None
            picture = kernel_picture(layers[layer], _kernel_ndim(record, layer))
            if picture is None:
                return None
            pictures.append(picture)
        if len({p.shape for p in pictures}) != 1:
            return None
        return np.mean(pictures, axis=0)

    layers, cells = [], []
    for layer in chosen_layers(list(first["scalings"]["final"])):
        row = [mean_picture(layer, per_seed) for _, per_seed in snapshots]
        if all(a is not None for a in row):
            layers.append(layer)
            cells.append(row)
    if not layers:
        return None
    return _heatmap_grid(
        cells,
        layers,
        [label for label, _ in snapshots],
        (
            f"Learned G of {method} at each refresh (start of the epoch, counted from 0)"
            if epochs
            else f"G of {method}, fixed (never refreshed)"
        )
        + f": mean over {_seed_count(runs)}, one colour scale",
        Path(path),
    )


def plot_kernel_magnitude(records: list[dict[str, Any]], path: str | Path):
    """Average kernel magnitude per method (paper Fig. 6), mean over seeds; the Figure.

    Rows: methods whose runs recorded ``kernel_magnitude`` (mean |W| per kernel position
    over a layer's filters, normalised to mean 1; the deployed model's); columns: the first,
    middle and last picturable layer that every row has.  Each cell is the mean over the
    method's seeds; one colour scale for the whole figure.  ``None`` when nothing is
    picturable.
    """
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for method in _methods_in_order(records):
        runs = [r for r in _by_seed(records, method).values() if r.get("kernel_magnitude")]
        if runs:
            rows.append((method, runs))
    if not rows:
        return None
    first = rows[0][1][0]["kernel_magnitude"]
    names = [n for n in first if kernel_picture(first[n], np.asarray(first[n]).ndim) is not None]
    layers = [
        n
        for n in chosen_layers(names)
        if all(n in r["kernel_magnitude"] for _, runs in rows for r in runs)
    ]
    if not layers:
        return None
    cells = []
    for _, runs in rows:
        row = []
        for layer in layers:
            mats = [np.asarray(r["kernel_magnitude"][layer], dtype=np.float64) for r in runs]
            row.append(kernel_picture(np.mean(mats, axis=0), mats[0].ndim))
        cells.append(row)
    return _heatmap_grid(
        cells,
        [f"{method}\n({_seed_count([r['seed'] for r in runs])})" for method, runs in rows],
        layers,
        "Average kernel magnitude (mean |W| per position over filters, mean 1): "
        "mean over seeds, one colour scale",
        Path(path),
    )


def _k_groups(records) -> dict[str, dict[float, str]]:
    """Method name without its ``@k=`` option → k → the method run with that k.

    Variants that differ in anything but k (``sgs``, ``sgs@mode=update``) stay apart; only
    groups with more than one k are kept.
    """
    groups: dict[str, dict[float, str]] = {}
    for method in _methods_in_order(records):
        first = next(iter(_by_seed(records, method).values()))
        if first.get("k") is None:
            continue
        group = re.sub(r"@k=[^@]*", "", method)
        groups.setdefault(group, {}).setdefault(float(first["k"]), method)
    return {g: by_k for g, by_k in groups.items() if len(by_k) > 1}


def _error_bars(stats: list[dict[str, Any]]) -> np.ndarray:
    """``(2, n)`` distances from each mean to its interval's ends, in points (0 without one)."""
    return np.array(
        [
            [100 * (s["mean"] - s["ci"][0]) if s["ci"] else 0.0 for s in stats],
            [100 * (s["ci"][1] - s["mean"]) if s["ci"] else 0.0 for s in stats],
        ]
    )


def plot_accuracy_vs_k(records: list[dict[str, Any]], path: str | Path):
    """Δ test accuracy against k (paper Fig. 8), paired by seed; returns the Figure.

    Per method family (the method names without their ``@k=`` option) and k: the mean of d_s
    against the baseline and its paired 95 % t-interval, with the baseline at 0.  Without a
    baseline in ``records`` the plot shows the mean test accuracy with its unpaired 95 %
    interval and says so in its title.  ``None`` when no method was run at more than one k.
    """
    groups = _k_groups(records)
    if not groups:
        return None
    paired = bool(_by_seed(records, BASELINE))
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    seeds: set[int] = set()
    for group, by_k in groups.items():
        ks, stats = [], []
        for k in sorted(by_k):
            if paired:
                values = paired_differences(records, by_k[k])
            else:
                values = {s: r["test_acc"] for s, r in _by_seed(records, by_k[k]).items()}
            if values:
                seeds |= set(values)
                ks.append(k)
                stats.append(summarize(list(values.values())))
        means = [100 * s["mean"] for s in stats]
        ax.errorbar(ks, means, yerr=_error_bars(stats), marker="o", capsize=3, label=group)
    n = _seed_count(seeds)
    if paired:
        ax.axhline(0.0, color="gray", ls="--", label=BASELINE)
        ax.set_ylabel(f"Δ test accuracy vs {BASELINE} (points)")
        ax.set_title(f"Δ against k, paired by seed ({n}): mean, 95% t-interval", fontsize=9)
    else:
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"Accuracy against k ({n}; no baseline: unpaired 95% CI)", fontsize=9)
    ax.set_xlabel("k")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return fig


def _plots(records, out_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot that the results support; returns ``(caption, relative path)``."""
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    plot_learning_curves(records, plots / "accuracy.png")
    made.append(("Learning curves", "plots/accuracy.png"))
    if plot_paired_differences(records, plots / "paired_differences.png") is not None:
        made.append(("Paired differences to the baseline", "plots/paired_differences.png"))
    for method in _methods_in_order(records):
        name = f"plots/scalings_{_safe(method)}.png"
        if plot_scalings(records, method, out_dir / name) is not None:
            made.append((f"G of {method} per layer", name))
    if plot_kernel_magnitude(records, plots / "kernel_magnitude.png") is not None:
        made.append(("Average kernel magnitude per layer", "plots/kernel_magnitude.png"))
    if plot_accuracy_vs_k(records, plots / "accuracy_vs_k.png") is not None:
        made.append(("Δ against k", "plots/accuracy_vs_k.png"))
    return made


# ---- entry point -------------------------------------------------------------------------
def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/results.json``; errors name the file."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {out_dir} a comparison folder?")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    required = {"method", "seed", "test_acc", "train_seconds", "params", "history"}
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty list of run records")
    for i, r in enumerate(records):
        missing = required - set(r) if isinstance(r, dict) else required
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
    return records


def write_report(
    out_dir: str | Path,
    records: list[dict[str, Any]] | None = None,
    reference: str = BASELINE,
) -> Path:
    """Write ``summary.json``, ``report.md`` and the plots into ``out_dir``.

    The runs are ``records`` when given (e.g. runs of several comparisons put side by side),
    otherwise those of ``out_dir/results.json``; the tables pair every method against
    ``reference`` (see :func:`summarize_records`).  Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    if records is None:
        records = load_results(out_dir)
    elif not records:
        raise ValueError(f"write_report: no records given for {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE
    config = load_config_file(config_path) if config_path.is_file() else None
    summary = summarize_records(records, reference)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        plots = _plots(records, out_dir)
        plot_note = ""
    except ImportError:
        plots = []
        plot_note = "Plots skipped: matplotlib is not installed (`pip install matplotlib`).\n"
    lines = [
        "# gradshape comparison",
        "",
        _settings_text(records, config),
        "",
        table(summary),
        "",
        "Test accuracies are final, in %, mean ± sample std over seeds. Δ: per seed, the "
        "method's test accuracy minus the baseline's of the same seed; its mean and 95% "
        "Student-t interval over those differences (paired). train s: mean training seconds "
        "(refreshes included, evaluation excluded). Structural methods are evaluated after "
        "fusion.",
        "",
        "## Fit and generalisation",
        "",
        gap_table(summary),
        "",
        "fit acc: the final model's accuracy on its training images without augmentation, in "
        "eval mode; running train acc: the last epoch's accuracy on the augmented batches in "
        "training mode. Gaps are per run, then mean and 95% t-interval over seeds.",
        "",
    ]
    text = scalings_text(records)
    if text:
        lines += ["## Learned spatial gradient scalings", "", text, ""]
    lines += ["## Plots", "", plot_note]
    lines += [f"![{caption}]({rel})\n" for caption, rel in plots]
    if config is not None:
        lines += [
            "## Configuration",
            "",
            f"`{CONFIG_FILE}` of this comparison; `gradshape compare --config {CONFIG_FILE} "
            "--out NEW_FOLDER` trains it again.",
            "",
            f"```yaml\n{dump_yaml(config).rstrip()}\n```",
            "",
        ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
