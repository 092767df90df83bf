"""Several methods × several seeds, paired, into one comparison folder.

Layout of ``out_dir``::

    runs/<method>-seed<k>/   checkpoint.pt, run.json      one folder per run
    results.json             list of the runs' records (see train.train_run)
    results.csv              one row per run: method, seed, k, accuracies, seconds, params
    report.md, summary.json, plots/*.png                  see report.write_report

Runs are *paired*: every method sees the same seeds, hence the same initial weights (for the
parts the methods share), data order and augmentations, so differences between methods can be
taken seed by seed.  Runs go seed by seed (all methods for the first seed, then the next), so
an interrupted comparison already holds complete pairs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..distributed import fail_together
from .config import RunConfig
from .launch import is_main_process
from .methods import parse_method
from .report import write_report
from .train import CHECKPOINT, RUN_RECORD, RunExistsError, train_run

__all__ = ["CSV_COLUMNS", "compare", "expand_k", "run_name"]

RESULTS = "results.json"
RESULTS_CSV = "results.csv"
#: Columns of ``results.csv``.
CSV_COLUMNS = (
    "method",
    "seed",
    "k",
    "test_acc",
    "val_acc",
    "train_seconds",
    "refresh_seconds",
    "params",
    "params_deployed",
    "epochs",
)


def run_name(method: str, seed: int) -> str:
    """The run folder's name: ``<method>-seed<k>``."""
    return f"{method}-seed{seed}"


def expand_k(methods: Sequence[str], ks: Sequence[float]) -> list[str]:
    """Spell every method that uses ``sgs.k`` once per k, as ``<method>@k=<k>``.

    With zero or one k the list is returned unchanged (a single k is set in the config).
    """
    if len(ks) <= 1:
        return list(methods)
    out = []
    for m in methods:
        parts, _ = parse_method(m)
        if any(p.uses_k for p in parts):
            out += [f"{m}@k={k:g}" for k in ks]
        else:
            out.append(m)
    return out


def _check_inputs(methods: Sequence[str], seeds: Sequence[int]) -> None:
    if not methods:
        raise ValueError("compare: give at least one method")
    if len(set(methods)) != len(methods):
        raise ValueError(f"compare: a method is listed twice in {list(methods)}")
    for m in methods:
        parse_method(m)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: seeds must be distinct and non-empty, got {list(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"compare: seeds must be ints >= 0, got {s!r}")


def _claim_folder(out_dir: Path, names: list[str], *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing comparison unless asked; with overwrite, clear our runs."""
    runs = out_dir / "runs"
    existing = [n for n in names if (runs / n).exists()]
    if (existing or (out_dir / RESULTS).exists()) and not (overwrite or resume):
        what = f"run folders {existing[:3]}" if existing else RESULTS
        raise RunExistsError(
            f"{out_dir} already holds {what}; pass --overwrite to replace them or --resume to "
            "finish the comparison"
        )
    if overwrite:
        for n in existing:
            shutil.rmtree(runs / n)
        for name in (RESULTS, RESULTS_CSV, "summary.json", "report.md"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "plots", ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)


def _write_results(out_dir: Path, records: list[dict[str, Any]]) -> None:
    tmp = out_dir / f".{RESULTS}.partial"
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(out_dir / RESULTS)
    with open(out_dir / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def compare(
    cfg: RunConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Train every method with every seed and write the comparison folder.

    Args:
        cfg: the settings shared by all runs (its ``method`` and ``seed`` are replaced).
        methods: method specs (see :mod:`~gradshape.experiments.methods`).
        seeds: the seeds; every method runs with each.
        out_dir: the comparison folder.
        overwrite: delete this comparison's existing run folders and results first.
        resume: keep finished runs, continue interrupted ones from their checkpoints.
        progress: progress bars / per-epoch lines on stderr.
        report: write ``report.md`` and the plots at the end.

    Returns the list of run records, as written to ``results.json``.
    """
    if overwrite and resume:
        raise ValueError("compare: overwrite and resume exclude each other: pick one")
    methods, seeds = list(methods), list(seeds)
    _check_inputs(methods, seeds)
    out_dir = Path(out_dir)
    plan = [(m, s) for s in seeds for m in methods]
    main = is_main_process()
    with fail_together("compare: claiming the output folder"):
        if main:
            names = [run_name(m, s) for m, s in plan]
            _claim_folder(out_dir, names, overwrite=overwrite, resume=resume)
    records: list[dict[str, Any]] = []
    for method, seed in plan:
        run_dir = out_dir / "runs" / run_name(method, seed)
        run_cfg = dataclasses.replace(cfg, method=method, seed=seed)
        partial = (run_dir / CHECKPOINT).exists() or (run_dir / RUN_RECORD).exists()
        records.append(train_run(run_cfg, run_dir, resume=resume and partial, progress=progress))
        if main:
            _write_results(out_dir, records)
    if report and main:
        write_report(out_dir)
    return records
