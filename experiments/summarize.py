"""Rebuild the study's views, its protocol facts and the tables in EXPERIMENTS.md.

    .venv/bin/python experiments/summarize.py

Each part of ``experiments/study.sh`` is one comparison folder.  A *view* sets runs of several
folders side by side, e.g. the k sweep next to the main table's baseline and its k = 5 run.
Runs are paired by seed: every part trains the same seeds in the same data order, and
:func:`view_records` refuses to combine runs whose data, model, optimiser or refresh settings
differ.  Each view gets ``experiments/results/views/<view>/`` (report.md, summary.json, plots)
and its table is written into EXPERIMENTS.md between ``<!-- view:<name> -->`` and
``<!-- /view:<name> -->``; :data:`SHOW` adds the gap table and plots to a view's block.

A *protocol* block (``<!-- protocol:<name> -->`` … ``<!-- /protocol:<name> -->``) states the
numbers of a study's protocol (images, steps, epochs, refreshes, evaluation, intervals) as
:func:`protocol_facts` derives them from the ``results.json`` of the parts of its views, so
that none of them is typed by hand.  To add a study: add its views to :data:`VIEWS`, list them
in :data:`PROTOCOLS`, and put both kinds of markers into EXPERIMENTS.md.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from gradshape.harness.report import (
    BASELINE,
    gap_table,
    load_results,
    summarize_records,
    table,
    write_report,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOC = ROOT.parent / "EXPERIMENTS.md"

# The main table's runs that other views are paired against.
ANCHORS = ("baseline", "sgs")

#: view name -> [(part folder, methods taken from it in this order, or None for all)]
VIEWS: dict[str, list[tuple[str, tuple[str, ...] | None]]] = {
    "main-vgg11": [("vgg11-main", None)],
    "main-resnet18": [("resnet18-main", None)],
    "resnet18-bn": [("resnet18-main", ("baseline", "sgs", "acb")), ("resnet18-bn", None)],
    "resnet18-lr": [("resnet18-lr", None)],
    "ablation": [("vgg11-main", ANCHORS), ("vgg11-ablation", None)],
    "k-sweep": [
        ("vgg11-main", ("baseline",)),
        ("vgg11-k", ("sgs@k=1", "sgs@k=2", "sgs@k=3")),
        ("vgg11-main", ("sgs",)),
        ("vgg11-k", ("sgs@k=7",)),
    ],
    "transforms": [("vgg11-main", ANCHORS), ("vgg11-transforms", None)],
    "optim-sgd": [("vgg11-main", ANCHORS), ("optim-sgd", None)],
    "optim-adam": [("optim-adam", None)],
    "optim-adamw": [("optim-adamw", None)],
    "optim-adagrad": [("optim-adagrad", None)],
    # the converged-regime study (experiments/converged.sh)
    "conv-main": [("conv-main", None)],
    "conv-lr-0.025": [("conv-lr-0.025", None)],
    "conv-lr-0.1": [("conv-lr-0.1", None)],
    "conv-lemma1": [("conv-lemma1", None)],
    "conv-frozen": [("conv-main", ANCHORS), ("conv-frozen", None)],
    "conv-ablation": [("conv-main", ANCHORS), ("conv-frozen", None), ("conv-grid", None)],
    "conv-autocorr-k": [("conv-main", ANCHORS), ("conv-autocorr-k", None)],
    "conv-structures": [("conv-main", ANCHORS), ("conv-structures", None)],
}

#: view name -> the method its Δ pairs against, where it is not the plain baseline.
REFERENCES: dict[str, str] = {"conv-lemma1": "acb@bn=after_sum"}

#: views whose grid points, or values of k, are chosen on the validation split (prefix).
CHOICES: dict[str, str] = {
    "ablation": "grid",
    "conv-ablation": "grid",
    "conv-autocorr-k": "sgs-autocorr",
}

#: The learning-rate sweep: (learning rate, part) in order; see :func:`lr_markdown`.
LR_SWEEP = ((0.025, "conv-lr-0.025"), (0.05, "conv-main"), (0.1, "conv-lr-0.1"))
# The main part's rate, against which each method's rate effect is paired.
_MAIN_LR = dict((part, lr) for lr, part in LR_SWEEP)["conv-main"]

#: view name -> what its block in EXPERIMENTS.md shows besides the table: "gap" (fit and
#: train-test gap table), "curves" (learning curves), "paired" (Δ per seed against the baseline).
SHOW: dict[str, tuple[str, ...]] = {
    "main-vgg11": ("gap", "curves", "paired"),
    "main-resnet18": ("gap", "curves", "paired"),
    "conv-main": ("gap", "curves", "paired"),
    "conv-structures": ("gap",),
}

#: protocol name -> the views whose parts it describes (see :func:`protocol_markdown`).
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "short": (
        "main-vgg11",
        "main-resnet18",
        "resnet18-bn",
        "resnet18-lr",
        "ablation",
        "k-sweep",
        "transforms",
        "optim-sgd",
        "optim-adam",
        "optim-adamw",
        "optim-adagrad",
    ),
    "converged": (
        "conv-main",
        "conv-lr-0.025",
        "conv-lr-0.1",
        "conv-lemma1",
        "conv-frozen",
        "conv-ablation",
        "conv-autocorr-k",
        "conv-structures",
    ),
}

# Settings that must agree for runs to be paired (the method's own sections may differ).
_SHARED = ("data", "model", "optim")
_SHARED_SGS = ("refresh_warmup", "refresh_every", "refresh_batches")
# No data set here has more images than this; accuracies are counts out of at most this many.
_MAX_IMAGES = 10**7


def _refresh_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The refresh settings a run shares with its part: those its method name does not set.

    ``sgs@refresh_every=1000`` sets its own ``refresh_every`` on purpose, so only the other
    settings must agree.  Records written before ``refresh_align`` existed refreshed as
    ``"warmup"`` does; the alignment is left out where both rules give the same epochs (every
    divides the warm-up).
    """
    s = record["config"]["sgs"]
    own = {
        item.partition("=")[0].strip().split(".")[-1] for item in record["method"].split("@")[1:]
    }
    settings = {f: s[f] for f in _SHARED_SGS}
    if s["refresh_every"] != 1 and s["refresh_warmup"] % s["refresh_every"]:
        settings["refresh_align"] = s.get("refresh_align", "warmup")
    return {k: v for k, v in settings.items() if k not in own}


def _check_pairable(name: str, records: list[dict[str, Any]]) -> None:
    shared = {tuple(repr(r["config"][section]) for section in _SHARED) for r in records}
    refresh: dict[str, set] = {}
    for r in records:
        for key, value in _refresh_settings(r).items():
            refresh.setdefault(key, set()).add(value)
    if len(shared) != 1 or any(len(values) > 1 for values in refresh.values()):
        raise ValueError(
            f"view {name!r}: its parts were trained with different data/model/optimiser/refresh "
            "settings, so their runs cannot be paired; rerun them with the same flags"
        )


def view_parts(name: str) -> list[str]:
    """The part folders of view ``name``, each once, in the order :data:`VIEWS` names them."""
    return list(dict.fromkeys(part for part, _ in VIEWS[name]))


def view_records(name: str) -> list[dict[str, Any]] | None:
    """The runs of view ``name`` in table order; ``None`` while one of its parts has none."""
    records: list[dict[str, Any]] = []
    for part, methods in VIEWS[name]:
        if not (RESULTS / part / "results.json").is_file():
            return None
        runs = load_results(RESULTS / part)
        if methods is None:
            records += runs
            continue
        for m in methods:
            picked = [r for r in runs if r["method"] == m]
            if not picked:
                return None
            records += picked
    _check_pairable(name, records)
    return records


def grid_choice(summary: dict[str, Any], prefix: str = "grid") -> str:
    """Which of the methods named ``prefix...`` (grid points, values of k) the validation
    split picks (the test set plays no part)."""
    rows = [r for r in summary["methods"] if r["method"].startswith(prefix)]
    if not rows or any(r["val_acc"] is None for r in rows):
        return ""
    listed = ", ".join(f"{r['method']} {100 * r['val_acc']['mean']:.2f}" for r in rows)
    best = max(rows, key=lambda r: r["val_acc"]["mean"])
    return (
        f"Validation accuracy % (mean over seeds) of the choices: {listed}. "
        f"Chosen on validation: **{best['method']}**."
    )


def lr_markdown() -> str:
    """The learning-rate sweep as one table: per rate, the baseline's and SGS's test accuracy
    and SGS's paired Δ with its interval (each rate's own part and seeds)."""
    lines = [
        "| learning rate | seeds | baseline test acc % | SGS test acc % | Δ SGS − baseline "
        "(paired) | 95% CI of Δ |",
        "|---|---|---|---|---|---|",
    ]
    for lr, part in LR_SWEEP:
        if not (RESULTS / part / "results.json").is_file():
            lines.append(f"| {lr:g} | *(not run yet)* | | | | |")
            continue
        rows = {r["method"]: r for r in summarize_records(load_results(RESULTS / part))["methods"]}
        if not {"baseline", "sgs"} <= set(rows):
            lines.append(f"| {lr:g} | *(incomplete)* | | | | |")
            continue
        base, sgs, diff = rows["baseline"], rows["sgs"], rows["sgs"]["paired_diff"]
        lines.append(
            f"| {lr:g} | {diff['n']} | {100 * base['test_acc']['mean']:.2f} | "
            f"{100 * sgs['test_acc']['mean']:.2f} | {_delta_cells(diff)} |"
        )
    return "\n".join([*lines, "", *_rate_effect_lines()])


def rate_effects() -> list[tuple[float, str, dict[str, Any]]]:
    """``(rate, method, paired Δ)`` for baseline and SGS at every other swept rate against
    themselves at the main part's rate, paired on the seeds both ran (same images, order,
    augmentation and initial weights)."""
    rates = [(lr, part) for lr, part in LR_SWEEP if (RESULTS / part / "results.json").is_file()]
    if "conv-main" not in (part for _, part in rates):
        return []
    reference = load_results(RESULTS / "conv-main")
    effects = []
    for lr, part in rates:
        if part == "conv-main":
            continue
        runs = load_results(RESULTS / part)
        for method in ("baseline", "sgs"):
            seeds = {r["seed"] for r in runs if r["method"] == method}
            if not seeds:
                continue
            pair = [
                dict(r, method=name)
                for name, pool in ((f"at {_MAIN_LR:g}", reference), (f"at {lr:g}", runs))
                for r in pool
                if r["method"] == method and r["seed"] in seeds
            ]
            row = summarize_records(pair, f"at {_MAIN_LR:g}")["methods"][1]
            effects.append((lr, method, row["paired_diff"]))
    return effects


def _rate_effect_lines() -> list[str]:
    effects = rate_effects()
    if not effects:
        return []
    lines = [
        f"The rate itself: each method against itself at {_MAIN_LR:g}, paired on the seeds both "
        "rates ran.",
        "",
        f"| learning rate | method | seeds | Δ vs the same method at {_MAIN_LR:g} (paired) "
        "| 95% CI of Δ |",
        "|---|---|---|---|---|",
    ]
    for lr, method, diff in effects:
        lines.append(f"| {lr:g} | {method} | {diff['n']} | {_delta_cells(diff)} |")
    return lines


def _delta_cells(diff: dict[str, Any]) -> str:
    """A paired Δ's mean and 95 % interval as two table cells, in points."""
    ci = diff["ci"]
    interval = "–" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
    return f"{100 * diff['mean']:+.2f} | {interval}"


def view_markdown(name: str, records: list[dict[str, Any]]) -> str:
    """The view's block: its table, then what :data:`SHOW` asks for.

    For the ablation the validation choice of the grid point follows the table.  Plots are
    linked only when the view's folder holds them (matplotlib installed).
    """
    seeds = sorted({r["seed"] for r in records})
    folder = f"experiments/results/views/{name}"
    summary = summarize_records(records, REFERENCES.get(name, BASELINE))
    lines = [
        table(summary),
        "",
        f"Seeds {', '.join(map(str, seeds))} (each row's count is in its seeds column); runs from "
        + ", ".join(f"`experiments/results/{p}`" for p in sorted(view_parts(name)))
        + f"; report and plots in `{folder}/`.",
    ]
    if name in CHOICES:
        lines += ["", grid_choice(summary, CHOICES[name])]
    show = SHOW.get(name, ())
    if "gap" in show:
        lines += [
            "",
            gap_table(summary),
            "",
            "Fit: the final model's accuracy on its own training images, un-augmented, in eval "
            "mode (– where the runs predate this record). Running: the last epoch's "
            "accuracy on the augmented batches in training mode. Gaps are per run, then mean "
            "and 95 % t-interval over seeds.",
        ]
    for key, file, caption in (
        ("curves", "accuracy.png", "learning curves"),
        ("paired", "paired_differences.png", "paired differences to the baseline, per seed"),
    ):
        if key in show and (RESULTS / "views" / name / "plots" / file).is_file():
            lines += ["", f"![{caption}, {name}]({folder}/plots/{file})"]
    return "\n".join(lines).rstrip()


# ---- the protocol, derived from the runs ---------------------------------------------------
def accuracy_denominator(values: list[float | None]) -> int | None:
    """The smallest n for which every accuracy in ``values`` is a whole count out of n.

    An accuracy is ``correct / total`` (``evaluate``), so ``total`` is a multiple of each
    reduced fraction's denominator; n is their least common multiple.  It equals ``total``
    unless every count shares a factor with it, which many values make vanishingly unlikely.
    ``None`` when ``values`` holds no number.
    """
    n = None
    for v in values:
        if v is None:
            continue
        d = Fraction(v).limit_denominator(_MAX_IMAGES).denominator
        n = d if n is None else math.lcm(n, d)
    return n


def _epoch_list(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers))


def _run_facts(r: dict[str, Any]) -> dict[str, Any]:
    """The protocol facts of one run (see :func:`protocol_facts`)."""
    o, s, h = r["config"]["optim"], r["config"]["sgs"], r["history"]
    batch = o["batch_size"]
    images = [e["images"] for e in h]
    steps = [math.ceil(n / batch) for n in images]
    refresh = tuple(e["epoch"] for e in h if e.get("refreshed"))
    evaluated = tuple(e["epoch"] for e in h if e.get("test_acc") is not None)
    if evaluated == tuple(range(len(h))):
        evaluation = "at the end of every epoch"
    elif evaluated == (len(h) - 1,):
        evaluation = "after the last epoch only"
    else:
        evaluation = f"at the end of epochs {_epoch_list(evaluated)} (counted from 0)"
    facts = {
        "train_images": images[0] if len(set(images)) == 1 else tuple(images),
        "batch_size": batch,
        "steps_per_epoch": steps[0] if len(set(steps)) == 1 else tuple(steps),
        "epochs": len(h),
        "steps": sum(steps),
        "warmup_steps": min(sum(steps), round(o["warmup_epochs"] * steps[0])),
        "evaluation": evaluation,
    }
    if len(set(images)) == 1:
        facts["last_batch"] = images[0] % batch
    if refresh:
        first = [e["epoch"] for e in h].index(refresh[0])
        facts["refresh_epochs"] = _epoch_list(refresh)
        facts["refresh_batches"] = s["refresh_batches"]
        facts["scaled_steps"] = sum(steps[first:])
    return facts


def protocol_facts(records: list[dict[str, Any]]) -> dict[str, Counter]:
    """Each protocol fact of ``records`` as a Counter ``value -> number of runs``.

    Per run (``config`` and ``history`` of its record): ``train_images`` (the history's
    ``images``, trained on per epoch), ``batch_size``, ``steps_per_epoch`` (⌈images / batch⌉,
    the loader's batches), ``last_batch`` (images in the last, partial batch; 0 when none),
    ``epochs``, ``steps`` (the run's total), ``warmup_steps`` (round(warm-up epochs × steps per
    epoch), the scheduler's), ``evaluation`` (when ``test_acc`` was measured), and for runs
    that refresh G: ``refresh_epochs`` (those with ``refreshed``, counted from 0),
    ``refresh_batches`` and ``scaled_steps`` (the steps from the first refresh on).  Per data
    set, over all its runs: ``val_images`` and ``test_images``, the
    :func:`accuracy_denominator` of every validation and test accuracy recorded; a run
    without a validation split counts under 0.  Also ``seeds``.
    """
    facts: dict[str, Counter] = {}
    for r in records:
        for key, value in _run_facts(r).items():
            facts.setdefault(key, Counter())[value] += 1
        facts.setdefault("seeds", Counter())[r["seed"]] += 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        d = r["config"]["data"]
        groups.setdefault((d["dataset"], d["val_fraction"]), []).append(r)
    val, test = Counter(), Counter()
    for runs in groups.values():
        vals = [e.get("val_acc") for r in runs for e in r["history"]]
        vals += [r.get("val_acc") for r in runs]
        val[accuracy_denominator(vals) or 0] += len(runs)
    for dataset in {r["config"]["data"]["dataset"] for r in records}:
        runs = [r for r in records if r["config"]["data"]["dataset"] == dataset]
        tests = [e.get("test_acc") for r in runs for e in r["history"]]
        test[accuracy_denominator(tests + [r["test_acc"] for r in runs])] += len(runs)
    facts["val_images"], facts["test_images"] = val, test
    return facts


def _fmt(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _value(counter: Counter) -> str:
    """The single value of a fact, or each value with its number of runs when they differ."""
    if len(counter) == 1:
        return _fmt(next(iter(counter)))
    return " or ".join(f"{_fmt(v)} ({n} runs)" for v, n in sorted(counter.items(), key=str))


def count_intervals(view_records_by_name: dict[str, list[dict[str, Any]]]) -> int:
    """How many distinct paired 95 % intervals of Δ the views' tables show.

    An interval is one method's runs against one set of reference runs (the baseline, or the
    view's entry in :data:`REFERENCES`) with at least two seeds in common; a row that two views
    share (the same runs) counts once.
    """
    seen = set()
    for name, records in view_records_by_name.items():
        reference = REFERENCES.get(name, BASELINE)
        base = tuple(
            sorted((r["seed"], r["test_acc"]) for r in records if r["method"] == reference)
        )
        for row in summarize_records(records, reference)["methods"]:
            diff = row["paired_diff"]
            if diff is None or diff["ci"] is None:
                continue
            runs = [r for r in records if r["method"] == row["method"]]
            seen.add((row["method"], tuple(sorted((r["seed"], r["test_acc"]) for r in runs)), base))
    return len(seen)


def protocol_markdown(
    facts: dict[str, Counter], parts: list[str], intervals: int | None = None
) -> str:
    """The protocol block: the facts of :func:`protocol_facts` as a markdown list."""
    f = facts
    runs = sum(f["epochs"].values())
    seeds = sorted(f["seeds"])
    contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
    seed_text = f"{seeds[0]}–{seeds[-1]}" if contiguous and len(seeds) > 1 else _epoch_list(seeds)
    last = _value(f["last_batch"]) if "last_batch" in f else "0"
    test = _value(f["test_images"])
    if set(f["val_images"]) == {0}:
        measured = f"There is no validation split; test accuracy is measured on {test} images"
    else:
        val = _value(f["val_images"])
        measured = f"Validation accuracy is measured on {val} images and test accuracy on {test}"
    lines = [
        f"*Derived by `experiments/summarize.py` from the {runs} runs in `results.json` of "
        f"{len(parts)} part{'s' * (len(parts) != 1)} (seeds {seed_text}); not typed by hand.*",
        "",
        f"- **Images.** Each run trains on {_value(f['train_images'])} images per epoch (the "
        f"`images` of its history). {measured} (the smallest counts that make every recorded "
        "accuracy a whole number of images).",
        f"- **Steps.** Batches of {_value(f['batch_size'])}: {_value(f['steps_per_epoch'])} "
        "steps per epoch"
        + (f" (the last batch holds {last} images)" if last != "0" else "")
        + f", {_value(f['epochs'])} epochs, {_value(f['steps'])} steps per run. "
        + (
            "No learning-rate warm-up."
            if set(f["warmup_steps"]) == {0}
            else f"The learning rate warms up over the first {_value(f['warmup_steps'])} steps."
        ),
    ]
    if "refresh_epochs" in f:
        refreshing = sum(f["refresh_epochs"].values())
        lines.append(
            f"- **Refreshes.** The {refreshing} runs that refresh G do so at the start of "
            f"epochs {_value(f['refresh_epochs'])} (counted from 0), each time from "
            f"{_value(f['refresh_batches'])} random training batches; G shapes the last "
            f"{_value(f['scaled_steps'])} of the {_value(f['steps'])} steps."
        )
    measures = "Test" if set(f["val_images"]) == {0} else "Validation and test"
    lines.append(f"- **Evaluation.** {measures} accuracy {_value(f['evaluation'])}.")
    if intervals is not None:
        lines.append(
            f"- **Intervals.** The tables of this study show {intervals} distinct paired 95 % "
            f"interval{'s' * (intervals != 1)} of Δ."
        )
    return "\n".join(lines)


def fill(doc: str, name: str, body: str, kind: str = "view") -> str:
    """``doc`` with the text between the ``kind:name`` markers replaced by ``body``."""
    start, end = f"<!-- {kind}:{name} -->", f"<!-- /{kind}:{name} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"{DOC.name} has no markers for {kind} {name!r}")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", doc)


def _protocol_body(name: str, views: dict[str, list[dict[str, Any]] | None]) -> str:
    parts = list(dict.fromkeys(p for v in PROTOCOLS[name] for p in view_parts(v)))
    present = [p for p in parts if (RESULTS / p / "results.json").is_file()]
    if not present:
        script = "converged" if name == "converged" else "study"
        return f"*(not run yet: `bash experiments/{script}.sh` runs its parts)*"
    records = [r for p in present for r in load_results(RESULTS / p)]
    done = {v: views[v] for v in PROTOCOLS[name] if views.get(v) is not None}
    intervals = count_intervals(done)
    if name == "converged":  # the learning-rate table's own intervals
        intervals += sum(diff["ci"] is not None for _, _, diff in rate_effects())
    body = protocol_markdown(protocol_facts(records), present, intervals)
    missing = [p for p in parts if p not in present]
    if missing:
        body += f"\n\nNot run yet: {', '.join(f'`{p}`' for p in missing)}."
    return body


#: tables built from several parts that are not one view: name -> builder (marker ``view:name``).
TABLES = {"conv-lr": lr_markdown}


def main() -> int:
    doc = DOC.read_text()
    views: dict[str, list[dict[str, Any]] | None] = {}
    for name in VIEWS:
        records = views[name] = view_records(name)
        if records is None:
            script = "converged" if name.startswith("conv-") else "study"
            body = f"*(not run yet: `bash experiments/{script}.sh` runs its parts)*"
        else:
            folder = RESULTS / "views" / name
            for stale in (folder / "plots").glob("*.png"):
                stale.unlink()
            write_report(folder, records, REFERENCES.get(name, BASELINE))
            body = view_markdown(name, records)
        doc = fill(doc, name, body)
        print(f"{name}: {'missing' if records is None else f'{len(records)} runs'}")
    for name, make in TABLES.items():
        doc = fill(doc, name, make())
    for name in PROTOCOLS:
        doc = fill(doc, name, _protocol_body(name, views), kind="protocol")
        print(f"protocol {name}: written")
    DOC.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
