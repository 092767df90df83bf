"""The comparison report, computed from ``results.json`` alone.

:func:`write_report` writes into the comparison folder

* ``summary.json``: per method the statistics below, as numbers (accuracies as fractions);
* ``report.md``: the same as a table, the settings, the learned G per layer, links to plots;
* ``plots/*.png`` (when matplotlib is installed): accuracy curves (mean over seeds), the learned
  G of the first, middle and last scaled layer at each refresh (paper Fig. 4/5), the average
  kernel magnitude matrices per method next to SGS's final G (Fig. 6), and accuracy against k
  when the results hold several k (Fig. 8).

Statistics, per method over its n seeds (x_s = final test accuracy of seed s):
mean x̄; sample standard deviation s = sqrt(Σ(x_s − x̄)²/(n − 1)); 95 % Student-t interval
x̄ ± t_{0.975, n−1}·s/√n.  Paired difference to ``baseline`` over the seeds both have:
d_s = x_s − b_s, then the same mean and t-interval of d.  Time ratio: mean training seconds
over the baseline's.  With n = 1 the spread and intervals are undefined (``null``, shown "–").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BASELINE",
    "chosen_layers",
    "load_results",
    "summarize",
    "summarize_records",
    "t_quantile",
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


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method, in first-seen order: the statistics of the module docstring.

    Returns ``{"baseline": "baseline" or None, "methods": [row, ...]}``; a row holds
    ``method``, ``seeds``, ``k``, ``test_acc`` and ``val_acc`` (:func:`summarize` dicts),
    ``paired_diff`` (against the baseline, ``None`` without one), ``train_seconds``,
    ``time_ratio``, ``params`` and ``params_deployed``.
    """
    base = _by_seed(records, BASELINE)
    base_time = summarize([r["train_seconds"] for r in base.values()])["mean"]
    rows = []
    for method in _methods_in_order(records):
        runs = _by_seed(records, method)
        first = next(iter(runs.values()))
        time = summarize([r["train_seconds"] for r in runs.values()])["mean"]
        common = sorted(set(runs) & set(base))
        val = [r["val_acc"] for r in runs.values() if r.get("val_acc") is not None]
        rows.append(
            {
                "method": method,
                "seeds": sorted(runs),
                "k": first.get("k"),
                "test_acc": summarize([r["test_acc"] for r in runs.values()]),
                "val_acc": summarize(val) if val else None,
                "paired_diff": (
                    summarize([runs[s]["test_acc"] - base[s]["test_acc"] for s in common])
                    if base and method != BASELINE
                    else None
                ),
                "train_seconds": time,
                "time_ratio": time / base_time if base_time else None,
                "params": first["params"],
                "params_deployed": first.get("params_deployed", first["params"]),
            }
        )
    return {"baseline": BASELINE if base else None, "methods": rows}


# ---- markdown ----------------------------------------------------------------------------
def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    return "–" if ci is None else f"[{_pct(ci[0], signed)}, {_pct(ci[1], signed)}]"


def _params(n: int, deployed: int) -> str:
    return f"{n:,}" if n == deployed else f"{n:,} → {deployed:,}"


def table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (accuracies in %)."""
    lines = [
        "| method | seeds | test acc % (mean ± std) | 95% CI | Δ vs baseline (paired) "
        "| 95% CI of Δ | train s | time × baseline | params (train → deployed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["methods"]:
        acc, diff = row["test_acc"], row["paired_diff"]
        std = "" if acc["std"] is None else f" ± {_pct(acc['std'])}"
        ratio = "–" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        lines.append(
            f"| {row['method']} | {acc['n']} | {_pct(acc['mean'])}{std} | "
            f"{_interval(acc['ci'])} | {_pct(diff['mean'], True) if diff else '–'} | "
            f"{_interval(diff['ci'], True) if diff else '–'} | {row['train_seconds']:.1f} | "
            f"{ratio} | {_params(row['params'], row['params_deployed'])} |"
        )
    return "\n".join(lines)


def _matrix_text(g: list) -> str:
    rows = g if isinstance(g[0], list) else [g]
    return "\n".join("  ".join(f"{v:5.2f}" for v in row) for row in rows)


def scalings_text(records: list[dict[str, Any]]) -> str:
    """The final learned G per layer of each scaling method's first seed, as text blocks."""
    blocks = []
    for method in _methods_in_order(records):
        runs = _by_seed(records, method)
        seed = min(runs)
        scal = runs[seed].get("scalings")
        if not scal:
            continue
        blocks.append(f"**{method}** (seed {seed}), final G per layer:\n")
        for layer, g in scal["final"].items():
            if not g:
                continue
            blocks.append(f"`{layer}`\n```\n{_matrix_text(g)}\n```")
    return "\n".join(blocks)


def _settings_text(records: list[dict[str, Any]]) -> str:
    c = records[0]["config"]
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


def _as_2d(g: list) -> np.ndarray | None:
    a = np.asarray(g, dtype=np.float64)
    if a.ndim == 1:
        return a[None, :]
    return a if a.ndim == 2 else None


def _heatmap(ax, a: np.ndarray, title: str, vmin: float, vmax: float) -> None:
    ax.imshow(a, cmap="viridis", vmin=vmin, vmax=vmax)
    mid = (vmin + vmax) / 2
    for (i, j), v in np.ndenumerate(a):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if v > mid else "white")  # fmt: skip
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _plot_accuracy(records, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(10, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for method in _methods_in_order(records):
        runs = list(_by_seed(records, method).values())
        epochs = min(len(r["history"]) for r in runs)
        x = np.arange(1, epochs + 1)
        test = np.mean([[h["test_acc"] for h in r["history"][:epochs]] for r in runs], axis=0)
        loss = np.mean([[h["train_loss"] for h in r["history"][:epochs]] for r in runs], axis=0)
        (line,) = ax_acc.plot(x, 100 * test, marker="o", ms=3, label=method)
        ax_loss.plot(x, loss, marker="o", ms=3, color=line.get_color(), label=method)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy %", title="Test accuracy (mean over seeds)")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss (mean over seeds)")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_scalings(method: str, record: dict[str, Any], path: Path) -> bool:
    scal = record["scalings"]
    snapshots = [(f"epoch {h['epoch']}", h["layers"]) for h in scal["history"]]
    if not snapshots:
        snapshots = [("fixed", scal["final"])]
    if len(snapshots) > 6:
        keep = sorted({round(i * (len(snapshots) - 1) / 5) for i in range(6)})
        snapshots = [snapshots[i] for i in keep]
    layers = [n for n in chosen_layers(list(scal["final"])) if _as_2d(scal["final"][n]) is not None]
    if not layers:
        return False
    mats = [[_as_2d(s[n]) for _, s in snapshots] for n in layers]
    fig = _new_figure(1.9 * len(snapshots) + 0.5, 1.9 * len(layers) + 0.6)
    axes = fig.subplots(len(layers), len(snapshots), squeeze=False)
    for i, layer in enumerate(layers):
        # one colour scale per layer, so its change across refreshes shows
        vmax = max(float(m.max()) for m in mats[i])
        for j, (label, _) in enumerate(snapshots):
            _heatmap(axes[i, j], mats[i][j], f"{layer}\n{label}", 0.0, vmax)
    fig.suptitle(f"Learned G of {method} (seed {record['seed']}) at each refresh", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _plot_kernel_magnitude(records, path: Path) -> bool:
    methods = _methods_in_order(records)
    rows: list[tuple[str, dict[str, list]]] = []
    for method in methods:
        runs = _by_seed(records, method)
        rec = runs[min(runs)]
        if rec.get("kernel_magnitude"):
            rows.append((f"|W| {method}", rec["kernel_magnitude"]))
        if rec.get("scalings"):
            rows.append((f"G {method}", rec["scalings"]["final"]))
    if not rows:
        return False
    names = [n for n in rows[0][1] if _as_2d(rows[0][1][n]) is not None]
    layers = [n for n in chosen_layers(names) if all(n in r for _, r in rows)]
    if not layers:
        return False
    fig = _new_figure(2.0 * len(layers) + 0.5, 1.9 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), len(layers), squeeze=False)
    for i, (label, mats) in enumerate(rows):
        for j, layer in enumerate(layers):
            # each panel on its own scale: the shape matters, G's range would flatten |W|'s
            a = _as_2d(mats[layer])
            _heatmap(axes[i, j], a, f"{label}\n{layer}", float(a.min()), float(a.max()))
    fig.suptitle("Average kernel magnitude (mean |W| over channels, mean 1) and SGS's G",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _k_groups(records) -> dict[str, dict[float, list[float]]]:
    groups: dict[str, dict[float, list[float]]] = {}
    for r in records:
        if r.get("k") is None:
            continue
        base = r["method"].split("@")[0]
        groups.setdefault(base, {}).setdefault(float(r["k"]), []).append(r["test_acc"])
    return {b: g for b, g in groups.items() if len(g) > 1}


def _plot_accuracy_vs_k(records, path: Path) -> bool:
    groups = _k_groups(records)
    if not groups:
        return False
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    for base, by_k in groups.items():
        ks = sorted(by_k)
        stats = [summarize(by_k[k]) for k in ks]
        means = np.array([100 * s["mean"] for s in stats])
        err = np.array([100 * (s["ci"][1] - s["mean"]) if s["ci"] else 0.0 for s in stats])
        ax.errorbar(ks, means, yerr=err, marker="o", capsize=3, label=base)
    base_runs = [r["test_acc"] for r in records if r["method"] == BASELINE]
    if base_runs:
        ax.axhline(100 * float(np.mean(base_runs)), color="gray", ls="--", label=BASELINE)
    ax.set(xlabel="k", ylabel="test accuracy %", title="Accuracy against k (mean, 95% CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _plots(records, out_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot that the results support; returns ``(caption, relative path)``."""
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    _plot_accuracy(records, plots / "accuracy.png")
    made.append(("Accuracy curves", "plots/accuracy.png"))
    for method in _methods_in_order(records):
        runs = _by_seed(records, method)
        rec = runs[min(runs)]
        name = f"plots/scalings_{_safe(method)}.png"
        if rec.get("scalings") and _plot_scalings(method, rec, out_dir / name):
            made.append((f"Learned G of {method} at each refresh", name))
    if _plot_kernel_magnitude(records, plots / "kernel_magnitude.png"):
        made.append(("Average kernel magnitude per layer", "plots/kernel_magnitude.png"))
    if _plot_accuracy_vs_k(records, plots / "accuracy_vs_k.png"):
        made.append(("Accuracy against k", "plots/accuracy_vs_k.png"))
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


def write_report(out_dir: str | Path, records: list[dict[str, Any]] | None = None) -> Path:
    """Write ``summary.json``, ``report.md`` and the plots into ``out_dir``.

    The runs are ``records`` when given (e.g. runs of several comparisons put side by side),
    otherwise those of ``out_dir/results.json``.  Returns the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    if records is None:
        records = load_results(out_dir)
    elif not records:
        raise ValueError(f"write_report: no records given for {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_records(records)
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
        _settings_text(records),
        "",
        table(summary),
        "",
        "Accuracies are final test accuracies in %; CI: 95% Student-t interval over seeds; "
        "Δ: paired by seed against the baseline; train s: mean training seconds (refreshes "
        "included, evaluation excluded). Structural methods are evaluated after fusion.",
        "",
    ]
    text = scalings_text(records)
    if text:
        lines += ["## Learned spatial gradient scalings", "", text, ""]
    lines += ["## Plots", "", plot_note]
    lines += [f"![{caption}]({rel})\n" for caption, rel in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
