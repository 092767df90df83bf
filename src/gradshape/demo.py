"""``make demo`` (``python -m gradshape.demo``): plain training vs SGS vs ACB, a few minutes on CPU.

A paired comparison (one seed) of ``baseline``, ``sgs`` and the structural ``acb`` on
Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed (a 15,000-image training
subset padded to 32×32, the full 10,000-image test set, VGG-11 at width 0.25 without its last
pooling stage), otherwise on scikit-learn's digits.  It is the same as::

    gradshape compare --methods baseline,sgs,acb --seeds 1 --data.dataset fashion-mnist \\
        --data.subset 15000 --data.pad_to 32 --model.name vgg11 --model.width 0.25 \\
        --model.drop_last_pool --optim.epochs 5 --optim.batch_size 128 --optim.lr 0.05 \\
        --optim.warmup_epochs 0.5 --sgs.refresh_every 5 --sgs.refresh_batches 10 \\
        --out runs/demo --overwrite

and ends by printing the report's table (with each method's training time against the
baseline's), the learned G of every layer and where the plots are.  SGS refreshes on the
paper's schedule in kind: after one warm-up epoch, then every 5 epochs (the ImageNet setting's
interval), so its cost is what a user pays, a few percent.  A demo this short shows the
machinery, not the method's benefit: the paper trains for hundreds of epochs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .harness.compare import compare
from .harness.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SGSConfig
from .harness.report import table

__all__ = ["FASHION_MNIST", "demo_config", "main"]

#: Where Debian's dataset-fashion-mnist puts the IDX files.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
OUT = Path("runs/demo")
METHODS = ("baseline", "sgs", "acb")


def demo_config(fashion: bool) -> RunConfig:
    """The demo's settings: Fashion-MNIST (``fashion``) or the digits fallback."""
    if fashion:
        data = DataConfig("fashion-mnist", subset=15_000, pad_to=32)
        epochs = 5
    else:
        data = DataConfig("digits", pad_to=32)
        epochs = 12
    return RunConfig(
        data=data,
        model=ModelConfig("vgg11", width=0.25, drop_last_pool=True),
        optim=OptimConfig(epochs=epochs, batch_size=128, lr=0.05, warmup_epochs=0.5),
        sgs=SGSConfig(refresh_warmup=1, refresh_every=5, refresh_batches=10),
    )


def _print_scalings(records: list[dict]) -> None:
    for r in records:
        if not r.get("scalings"):
            continue
        print(f"\nLearned G of {r['method']} (seed {r['seed']}) per layer, after the last refresh:")
        for layer, g in r["scalings"]["final"].items():
            rows = g if isinstance(g[0], list) else [g]
            print(f"  {layer}")
            for row in rows:
                print("    " + "  ".join(f"{v:5.2f}" for v in row))


def main() -> int:
    fashion = (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists()
    cfg = demo_config(fashion)
    print(
        f"gradshape demo: {', '.join(METHODS)} on {cfg.data.dataset} "
        f"({'15,000-image subset, ' if fashion else ''}{cfg.optim.epochs} epochs, "
        f"{cfg.model.name} width {cfg.model.width}); writing {OUT}/",
        flush=True,
    )
    start = time.perf_counter()
    records = compare(cfg, METHODS, [0], OUT, overwrite=True)
    wall = time.perf_counter() - start
    print()
    print(table(json.loads((OUT / "summary.json").read_text())))
    _print_scalings(records)
    plots = sorted(p.name for p in (OUT / "plots").glob("*.png"))
    print(f"\nReport: {OUT / 'report.md'}")
    print(f"Plots in {OUT / 'plots'}: {', '.join(plots) or 'none (matplotlib missing)'}")
    print(f"Wall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
