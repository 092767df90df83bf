"""Rebuild the study's views and the tables in EXPERIMENTS.md from ``experiments/results/``.

    .venv/bin/python experiments/summarize.py

Each part of ``experiments/study.sh`` is one comparison folder.  A *view* sets runs of several
folders side by side, e.g. the k sweep next to the main table's baseline and its k = 5 run.
Runs are paired by seed: every part trains the same seeds in the same data order, and
:func:`view_records` refuses to combine runs whose data, model, optimiser or refresh settings
differ.  Each view gets ``experiments/results/views/<view>/`` (report.md, summary.json, plots)
and its table is written into EXPERIMENTS.md between ``<!-- view:<name> -->`` and
``<!-- /view:<name> -->``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from gradshape.experiments.report import load_results, summarize_records, table, write_report

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
}

# Settings that must agree for runs to be paired (the method's own sections may differ).
_SHARED = ("data", "model", "optim")
_SHARED_SGS = ("refresh_warmup", "refresh_every", "refresh_batches")


def _pairing_key(record: dict[str, Any]) -> tuple:
    c = record["config"]
    return (
        tuple(repr(c[s]) for s in _SHARED),
        tuple(c["sgs"][f] for f in _SHARED_SGS),
    )


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
    keys = {_pairing_key(r) for r in records}
    if len(keys) != 1:
        raise ValueError(
            f"view {name!r}: its parts were trained with different data/model/optimiser/refresh "
            "settings, so their runs cannot be paired; rerun them with the same flags"
        )
    return records


def grid_choice(summary: dict[str, Any]) -> str:
    """Which grid point the validation split picks (the test set plays no part)."""
    rows = [r for r in summary["methods"] if r["method"].startswith("grid")]
    if not rows or any(r["val_acc"] is None for r in rows):
        return ""
    listed = ", ".join(f"{r['method']} {100 * r['val_acc']['mean']:.2f}" for r in rows)
    best = max(rows, key=lambda r: r["val_acc"]["mean"])
    return (
        f"Validation accuracy % (mean over seeds) of the grid points: {listed}. "
        f"Chosen on validation: **{best['method']}**."
    )


def view_markdown(name: str, records: list[dict[str, Any]]) -> str:
    """The view's table (and, for the ablation, the validation choice of the grid point)."""
    seeds = sorted({r["seed"] for r in records})
    parts = sorted({part for part, _ in VIEWS[name]})
    summary = summarize_records(records)
    lines = [
        table(summary),
        "",
        f"Seeds {', '.join(map(str, seeds))} (each row's count is in its seeds column); runs from "
        + ", ".join(f"`experiments/results/{p}`" for p in parts)
        + f"; report and plots in `experiments/results/views/{name}/`.",
    ]
    if name == "ablation":
        lines += ["", grid_choice(summary)]
    return "\n".join(lines).rstrip()


def fill(doc: str, name: str, body: str) -> str:
    """``doc`` with the text between view ``name``'s markers replaced by ``body``."""
    start, end = f"<!-- view:{name} -->", f"<!-- /view:{name} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"{DOC.name} has no markers for view {name!r}")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", doc)


def main() -> int:
    doc = DOC.read_text()
    for name in VIEWS:
        records = view_records(name)
        if records is None:
            body = "*(not run yet: `bash experiments/study.sh` runs its parts)*"
        else:
            write_report(RESULTS / "views" / name, records)
            body = view_markdown(name, records)
        doc = fill(doc, name, body)
        print(f"{name}: {'missing' if records is None else f'{len(records)} runs'}")
    DOC.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
