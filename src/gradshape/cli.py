"""The ``gradshape`` command: ``train`` one run, ``compare`` methods × seeds, ``report`` again.

The command only parses flags into a :class:`~gradshape.experiments.config.RunConfig` and calls
the library (:func:`~gradshape.experiments.train.train_run`,
:func:`~gradshape.experiments.compare.compare`,
:func:`~gradshape.experiments.report.write_report`); everything it does is callable from Python.
Expected failures (missing data, an existing run folder, a bad setting) print one line
``gradshape: error: ...`` on stderr and exit with status 2.

Several processes: ``torchrun --nproc_per_node N -m gradshape train|compare ...`` trains with
DistributedDataParallel (see :mod:`~gradshape.experiments.launch`); rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .experiments.config import (
    OPTIMIZERS,
    BranchConfig,
    CDGConfig,
    DataConfig,
    GridConfig,
    ModelConfig,
    OptimConfig,
    PGTConfig,
    ReparamConfig,
    RunConfig,
    SGSConfig,
)
from .experiments.data import DATASETS
from .experiments.launch import is_main_process, process_group
from .experiments.methods import METHODS
from .experiments.models import MODELS

__all__ = ["build_parser", "main"]

_SPEC_HELP = (
    "Combine methods with '+' (e.g. sgs+cdg, sgs+pgt; applied in the order written) and\n"
    "override a method setting with '@key=value' (e.g. sgs@k=3, grid@alpha=2@beta=4)."
)
_METHODS_HELP = "methods:\n" + "\n".join(
    f"  {i.name:<13} {i.description}" for i in METHODS.values()
)


def _csv_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _seeds(text: str) -> list[int] | int:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or a comma list of ints: {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be ints >= 0, got {text!r}") from None
    return values[0] if "," not in text else values


def _run_flags() -> argparse.ArgumentParser:
    """The flags shared by ``train`` and ``compare`` (defaults from the config classes)."""
    p = argparse.ArgumentParser(add_help=False)
    data, model, optim = DataConfig(), ModelConfig(), OptimConfig()
    sgs, grid, cdg, pgt = SGSConfig(), GridConfig(), CDGConfig(), PGTConfig()

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=data.dataset,
        choices=list(DATASETS),
        help="data set (default %(default)s)",
    )
    g.add_argument(
        "--data-path",
        default=None,
        metavar="DIR",
        help="folder holding the data set's files (default: the data set's usual "
        "place, e.g. /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument(
        "--subset",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N training images only (quick runs)",
    )
    g.add_argument(
        "--pad-to",
        type=int,
        default=None,
        metavar="SIZE",
        help="zero-pad images to SIZE×SIZE (e.g. 32 for 28×28 Fashion-MNIST)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=data.val_fraction,
        metavar="F",
        help="hold out this fraction of the training set as validation (default %(default)s: none)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=data.image_size,
        metavar="SIZE",
        help="side length image folders are resized and cropped to (imagefolder only; "
        "default %(default)s)",
    )
    g.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="switch off the data set's training augmentation",
    )
    g.add_argument(
        "--num-workers",
        type=int,
        default=data.num_workers,
        metavar="N",
        help="DataLoader worker processes (default %(default)s)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=model.name,
        choices=list(MODELS),
        help="architecture (default %(default)s)",
    )
    g.add_argument(
        "--width",
        type=float,
        default=model.width,
        help="channel width multiplier (default %(default)s)",
    )
    g.add_argument(
        "--drop-last-pool",
        action="store_true",
        help="drop the last pooling stage so deep convs see larger maps",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--epochs", type=int, default=optim.epochs, help="training epochs (default %(default)s)"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=optim.batch_size,
        help="training images per batch (default %(default)s)",
    )
    g.add_argument(
        "--optimizer",
        default=optim.name,
        choices=OPTIMIZERS,
        help="default %(default)s (SGD uses --momentum)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=optim.lr,
        help="peak learning rate; cosine decay to 0 after the warm-up (default %(default)s)",
    )
    g.add_argument(
        "--momentum",
        type=float,
        default=optim.momentum,
        help="SGD/RMSprop momentum (default %(default)s)",
    )
    g.add_argument(
        "--wd",
        "--weight-decay",
        dest="weight_decay",
        type=float,
        default=optim.weight_decay,
        help="weight decay (default %(default)s)",
    )
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=optim.warmup_epochs,
        help="linear learning-rate warm-up, in epochs (default %(default)s)",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=optim.label_smoothing,
        help="cross-entropy label smoothing (default %(default)s)",
    )

    g = p.add_argument_group("spatial gradient scaling (methods sgs, sgs-autocorr, grid)")
    g.add_argument(
        "--k",
        type=_csv_floats,
        default=f"{sgs.k:g}",
        metavar="K[,K...]",
        help="k of the k-transform (paper Eq. 8; default %(default)s); compare "
        "accepts several, e.g. 1,3,5, and then runs each SGS method once per k",
    )
    g.add_argument(
        "--measure",
        default=sgs.measure,
        choices=["nmi", "autocorrelation"],
        help="spatial dependence measure of 'sgs' (default %(default)s)",
    )
    g.add_argument(
        "--sgs-mode",
        default=sgs.mode,
        choices=["gradient", "update"],
        help="scale the gradient, or the optimizer's step (the paper's Adagrad*, "
        "for adaptive optimizers) (default %(default)s)",
    )
    g.add_argument(
        "--refresh-warmup",
        type=int,
        default=sgs.refresh_warmup,
        metavar="E",
        help="epochs with G = 1 before the first refresh (default %(default)s)",
    )
    g.add_argument(
        "--refresh-every",
        type=int,
        default=sgs.refresh_every,
        metavar="E",
        help="recompute G every E epochs (default %(default)s, the paper's "
        "CIFAR setting for 600 epochs: lower it for short runs)",
    )
    g.add_argument(
        "--refresh-batches",
        type=int,
        default=sgs.refresh_batches,
        metavar="B",
        help="random training batches per refresh (default %(default)s)",
    )
    g.add_argument(
        "--refresh-align",
        default=sgs.refresh_align,
        choices=["paper", "warmup"],
        help="'paper': refresh at the warm-up epoch, then at every epoch divisible by "
        "--refresh-every (the authors' code); 'warmup': every --refresh-every epochs counted "
        "from the warm-up (default %(default)s)",
    )
    g.add_argument(
        "--diag-removal",
        action="store_true",
        help="drop zero pixel pairs before the histogram (paper's ImageNet setting)",
    )
    g.add_argument(
        "--grid-alpha",
        type=float,
        default=grid.alpha,
        help="method grid: centre/edge ratio of G (default %(default)s)",
    )
    g.add_argument(
        "--grid-beta",
        type=float,
        default=grid.beta,
        help="method grid: centre/corner ratio of G (default %(default)s)",
    )

    g.add_argument(
        "--branch-kind",
        default=BranchConfig().kind,
        choices=["acb", "repvgg", "dbb"],
        help="method branch: the structure whose Lemma-1 G = sum of masks is applied "
        "(default %(default)s)",
    )

    g = p.add_argument_group("other methods")
    g.add_argument(
        "--cdg-a",
        type=float,
        default=cdg.a,
        help="CDG weight a of the zero-mean part (default %(default)s)",
    )
    g.add_argument(
        "--cdg-smoothing",
        type=float,
        default=cdg.smoothing,
        help="CDG Sobolev smoothing λ (default %(default)s)",
    )
    g.add_argument(
        "--cdg-axis",
        default=cdg.axis,
        choices=["output", "input", "spatial"],
        help="CDG direction (default %(default)s, the paper's)",
    )
    g.add_argument(
        "--pgt-alpha",
        type=float,
        default=pgt.alpha,
        help="PowerGrad power α in (0, 1] (default %(default)s)",
    )
    g.add_argument(
        "--reparam-bn",
        default=ReparamConfig().bn,
        choices=["per_branch", "after_sum"],
        help="structural methods: BatchNorm per branch (the papers') or one after "
        "the sum (Lemma 1's form) (default %(default)s)",
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of weights, data order, augmentation, refresh batches "
        "(default %(default)s; compare: the first seed)",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="float16 mixed precision with a GradScaler (default: on for CUDA)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=RunConfig().eval_every,
        metavar="N",
        help="evaluate after every N-th epoch and after the last (0: after the last only; "
        "default %(default)s)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (train: runs/<method>-seed<seed>; compare: runs/compare)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace the runs already in the output folder"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted runs from their checkpoints, skip finished ones",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars or per-epoch lines",
    )
    return p


def _config(args: argparse.Namespace, method: str, k: float) -> RunConfig:
    return RunConfig(
        method=method,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        eval_every=args.eval_every,
        data=DataConfig(
            dataset=args.dataset,
            path=args.data_path,
            subset=args.subset,
            pad_to=args.pad_to,
            val_fraction=args.val_fraction,
            image_size=args.image_size,
            augment=args.augment,
            num_workers=args.num_workers,
        ),
        model=ModelConfig(args.model, args.width, args.drop_last_pool),
        optim=OptimConfig(
            name=args.optimizer,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
        ),
        sgs=SGSConfig(
            k=k,
            measure=args.measure,
            mode=args.sgs_mode,
            refresh_warmup=args.refresh_warmup,
            refresh_every=args.refresh_every,
            refresh_batches=args.refresh_batches,
            refresh_align=args.refresh_align,
            diag_removal=args.diag_removal,
        ),
        grid=GridConfig(args.grid_alpha, args.grid_beta),
        cdg=CDGConfig(args.cdg_a, args.cdg_smoothing, args.cdg_axis),
        pgt=PGTConfig(args.pgt_alpha),
        reparam=ReparamConfig(args.reparam_bn),
        branch=BranchConfig(args.branch_kind),
    )


def _train(args: argparse.Namespace) -> int:
    from .experiments.train import train_run

    if len(args.k) != 1:
        raise ValueError("train takes one --k; use compare for several")
    cfg = _config(args, args.method, args.k[0])
    out = args.out or Path("runs") / f"{args.method}-seed{args.seed}"
    record = train_run(
        cfg, out, resume=args.resume, overwrite=args.overwrite, progress=args.progress
    )
    if not is_main_process():
        return 0
    print(
        f"{record['method']} seed {record['seed']}: test accuracy {100 * record['test_acc']:.2f}%"
        f", {record['train_seconds']:.1f} s training, {record['params_deployed']:,} parameters"
        f"; record in {out / 'run.json'}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .experiments.compare import compare, expand_k
    from .experiments.report import table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = expand_k(methods, args.k)
    seeds = (
        list(range(args.seed, args.seed + args.seeds))
        if isinstance(args.seeds, int)
        else args.seeds
    )
    if not seeds:
        raise ValueError("--seeds: give a count >= 1 or a list of seeds")
    cfg = _config(args, methods[0] if methods else "baseline", args.k[0])
    out = args.out or Path("runs") / "compare"
    compare(
        cfg,
        methods,
        seeds,
        out,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=args.progress,
        jobs=args.jobs,
    )
    if not is_main_process():
        return 0
    print(table(json.loads((out / "summary.json").read_text())))
    print(f"\nreport: {out / 'report.md'}  plots: {out / 'plots'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments.report import write_report

    path = write_report(args.dir)
    print(path.read_text())
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``gradshape`` argument parser with its three subcommands."""
    parser = argparse.ArgumentParser(
        prog="gradshape",
        description="Train and compare gradient-reshaping methods (Spatial Gradient Scaling, "
        "CDG, PowerGrad) against plain training and structural reparameterization.",
        epilog="Run 'gradshape <command> --help' for each command's flags.\n\n"
        + f"{_METHODS_HELP}\n\n{_SPEC_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="command", help="train, compare or report"
    )
    run_flags = _run_flags()
    epilog = f"{_METHODS_HELP}\n\n{_SPEC_HELP}"

    train = sub.add_parser(
        "train",
        parents=[run_flags],
        help="train one method once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one method with one seed; writes run.json and checkpoint.pt into "
        "the output folder.",
        epilog=epilog,
    )
    train.add_argument(
        "--method", default="baseline", help="method spec (default %(default)s), see below"
    )
    train.set_defaults(func=_train)

    comp = sub.add_parser(
        "compare",
        parents=[run_flags],
        help="train methods × seeds and write a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every method with every seed (paired: same seeds, same data order) "
        "and write results.json, results.csv, summary.json, report.md and plots/ into the "
        "output folder.",
        epilog=epilog,
    )
    comp.add_argument(
        "--methods",
        default="baseline,sgs",
        help="comma-separated method specs (default %(default)s), see below",
    )
    comp.add_argument(
        "--seeds",
        type=_seeds,
        default=3,
        metavar="N|S1,S2,...",
        help="number of seeds counting up from --seed, or an explicit list (default %(default)s)",
    )
    comp.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at once, each in its own process (default %(default)s; give each "
        "its share of the cores, e.g. OMP_NUM_THREADS=1 with --jobs 2 on 2 cores)",
    )
    comp.set_defaults(func=_compare)

    rep = sub.add_parser(
        "report",
        help="regenerate report.md and the plots of a comparison folder",
        description="Rewrite summary.json, report.md and plots/ from DIR/results.json.",
    )
    rep.add_argument("dir", type=Path, metavar="DIR", help="a folder written by compare")
    rep.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with process_group(getattr(args, "device", "cpu")):
            return args.func(args)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"gradshape: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradshape: interrupted; continue with --resume", file=sys.stderr)
        return 130
