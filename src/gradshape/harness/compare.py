"""Several methods × several seeds, paired, into one comparison folder.

Layout of ``out_dir``::

    config.yaml              the comparison's settings: a config file for gradshape compare
    runs/<method>-seed<k>/   config.yaml, checkpoint.pt, run.json      one folder per run
    results.json             list of the runs' records (see train.train_run)
    results.csv              one row per run: method, seed, k, accuracies, seconds, params
    report.md, summary.json, plots/*.png                  see report.write_report

Runs are *paired*: every method sees the same seeds, hence the same initial weights (for the
parts the methods share), data order and augmentations, so differences between methods can be
taken seed by seed.  Runs go seed by seed (all methods for the first seed, then the next), so
an interrupted comparison already holds complete pairs.  With ``jobs > 1`` that many runs train
side by side in worker processes (each run's arithmetic is unchanged: a run is a function of its
config alone), taken in the same order.

``config.yaml`` holds the shared settings (the :class:`~.config.RunConfig` without ``method``)
with ``methods`` and ``seeds``: ``gradshape compare --config <folder>/config.yaml --out NEW``
trains the same comparison again.  With ``resume`` a comparison whose ``config.yaml`` holds
other shared settings is refused before anything trains (the message names the keys); methods
and seeds may change (a resumed comparison may add seeds or methods), and each run is checked
against its own folder's ``config.yaml`` as well.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import shutil
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..distributed import fail_together, rank_and_world
from .config import CONFIG_FILE, RunConfig, load_config_file, write_config_file
from .launch import is_main_process
from .methods import parse_method
from .report import write_report
from .tracking import check_logger
from .train import CHECKPOINT, RUN_RECORD, RunExistsError, _check_same_settings, train_run

__all__ = ["CSV_COLUMNS", "compare", "comparison_config", "expand_k", "run_name"]

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


def comparison_config(
    cfg: RunConfig, methods: Sequence[str], seeds: Sequence[int]
) -> dict[str, Any]:
    """The content of a comparison's ``config.yaml``: ``cfg`` without ``method`` (each run's
    is one of ``methods``), then ``methods`` and ``seeds``; the keys of a ``gradshape compare``
    config file."""
    shared = cfg.to_dict()
    del shared["method"]
    return {**shared, "methods": list(methods), "seeds": list(seeds)}


def _check_comparison(out_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a comparison whose config.yaml holds other shared settings."""
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return  # a comparison made before config.yaml: each run is checked on its own
    saved = load_config_file(path)
    shared = {k: v for k, v in saved.items() if k not in ("methods", "seeds")}
    # method and seed are each run's own; they never differ from the comparison's
    _check_same_settings({**shared, "method": cfg.method, "seed": cfg.seed}, cfg, path)


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
    jobs: int = 1,
    logger: str | None = None,
) -> list[dict[str, Any]]:
    """Train every method with every seed and write the comparison folder.

    Args:
        cfg: the settings shared by all runs (its ``method`` and ``seed`` are replaced).
        methods: method specs (see :mod:`~gradshape.harness.methods`).
        seeds: the seeds; every method runs with each.
        out_dir: the comparison folder.
        overwrite: delete this comparison's existing run folders and results first.
        resume: keep finished runs, continue interrupted ones from their checkpoints.
        progress: progress bars / per-epoch lines on stderr.
        report: write ``report.md`` and the plots at the end.
        jobs: runs trained at once, each in its own process (give each process its share of
            the cores, e.g. ``OMP_NUM_THREADS=1`` with ``jobs=2`` on 2 cores).  Must be 1 under
            ``torchrun``.
        logger: live tracking of every run (see :func:`~.train.train_run`).

    Returns the list of run records in the order of the plan, as written to ``results.json``
    (with ``jobs > 1``, rewritten as runs finish, holding the finished ones).
    """
    if overwrite and resume:
        raise ValueError("compare: overwrite and resume exclude each other: pick one")
    methods, seeds = list(methods), list(seeds)
    _check_inputs(methods, seeds)
    check_logger(logger)
    out_dir = Path(out_dir)
    plan = [(m, s) for s in seeds for m in methods]
    main = is_main_process()
    with fail_together("compare: claiming the output folder"):
        if main:
            names = [run_name(m, s) for m, s in plan]
            if resume:
                _check_comparison(out_dir, cfg)
            _claim_folder(out_dir, names, overwrite=overwrite, resume=resume)
            write_config_file(out_dir / CONFIG_FILE, comparison_config(cfg, methods, seeds))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"compare: jobs must be an int >= 1, got {jobs!r}")
    if jobs > 1 and rank_and_world()[1] > 1:
        raise ValueError("compare: jobs > 1 cannot be combined with torchrun; use one or the other")
    runs = []
    for method, seed in plan:
        run_dir = out_dir / "runs" / run_name(method, seed)
        run_cfg = dataclasses.replace(cfg, method=method, seed=seed)
        partial = (run_dir / CHECKPOINT).exists() or (run_dir / RUN_RECORD).exists()
        runs.append((run_cfg, run_dir, resume and partial))
    if jobs == 1:
        records: list[dict[str, Any]] = []
        for run_cfg, run_dir, again in runs:
            records.append(
                train_run(run_cfg, run_dir, resume=again, progress=progress, logger=logger)
            )
            if main:
                _write_results(out_dir, records)
    else:
        records = _run_in_parallel(runs, out_dir, jobs, progress, logger)
    if report and main:
        write_report(out_dir)
    return records


def _run_in_parallel(
    runs: list[tuple[RunConfig, Path, bool]],
    out_dir: Path,
    jobs: int,
    progress: bool,
    logger: str | None,
) -> list[dict[str, Any]]:
    """Train ``runs`` in ``jobs`` worker processes; results.json grows as they finish.

    A failed run stops the runs not yet started and is raised once the running ones end (their
    checkpoints are kept, so ``resume`` continues them).
    """
    done: dict[int, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(train_run, c, d, resume=again, progress=progress, logger=logger): i
            for i, (c, d, again) in enumerate(runs)
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is None:
                    done[futures[future]] = future.result()
            _write_results(out_dir, [done[i] for i in sorted(done)])
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                for future in pending:
                    future.cancel()
                wait(pending)
                raise failed[0].exception()
    return [done[i] for i in range(len(runs))]
