"""experiments/summarize.py: views pair runs of several comparison folders, or refuse to."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "summarize.py"


@pytest.fixture
def summarize(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("study_summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "DOC", tmp_path / "EXPERIMENTS.md")
    return module


CONFIG = {
    "data": {"dataset": "digits", "subset": None, "pad_to": None, "val_fraction": 0.1},
    "model": {"name": "tiny", "width": 1.0, "drop_last_pool": False},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 1,
              "batch_size": 64, "warmup_epochs": 0.0, "label_smoothing": 0.0},
    "sgs": {"k": 5.0, "measure": "nmi", "mode": "gradient", "refresh_warmup": 1,
            "refresh_every": 1, "refresh_batches": 2},
}  # fmt: skip


def _record(method, seed, acc, k=None, val=None, **config_changes):
    config = copy.deepcopy(CONFIG)
    for key, value in config_changes.items():
        section, name = key.split("__")
        config[section][name] = value
    if k is not None:
        config["sgs"]["k"] = k
    history = [{"epoch": 0, "train_loss": 1.0, "train_acc": acc, "val_acc": val,
                "test_acc": acc, "seconds": 1.0, "lr": 0.1}]  # fmt: skip
    return {"method": method, "seed": seed, "k": k, "config": config, "test_acc": acc,
            "val_acc": val, "train_seconds": 1.0, "params": 10, "history": history}  # fmt: skip


def _write(folder: Path, records) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(records))


def test_k_sweep_view_pairs_folders_and_orders_k(summarize, tmp_path):
    main = [_record("baseline", s, 0.80 + 0.01 * s) for s in range(3)]
    main += [_record("sgs", s, 0.83 + 0.01 * s, k=5.0) for s in range(3)]
    sweep = [_record(f"sgs@k={k}", s, 0.70 + 0.01 * k, k=float(k)) for s in range(3)
             for k in (7, 1, 3, 2)]  # fmt: skip
    _write(tmp_path / "results/vgg11-main", main)
    _write(tmp_path / "results/vgg11-k", sweep)
    records = summarize.view_records("k-sweep")
    order = list(dict.fromkeys(r["method"] for r in records))
    assert order == ["baseline", "sgs@k=1", "sgs@k=2", "sgs@k=3", "sgs", "sgs@k=7"]
    rows = {r["method"]: r for r in summarize.summarize_records(records)["methods"]}
    # paired against the other folder's baseline, seed by seed: 0.73 - 0.80 - 0.01 s, mean over s
    assert rows["sgs@k=3"]["paired_diff"]["mean"] == pytest.approx(0.73 - 0.81, abs=1e-12)


def test_runs_with_different_settings_are_not_paired(summarize, tmp_path):
    _write(tmp_path / "results/vgg11-main", [_record("baseline", 0, 0.8), _record("sgs", 0, 0.8)])
    _write(tmp_path / "results/vgg11-transforms", [_record("cdg", 0, 0.8, optim__lr=0.05)])
    with pytest.raises(ValueError, match="transforms.*cannot be paired"):
        summarize.view_records("transforms")


def test_main_fills_only_the_markers_and_marks_missing_views(summarize, tmp_path):
    doc = "".join(
        f"text {name}\n<!-- view:{name} -->\nold\n<!-- /view:{name} -->\n"
        for name in summarize.VIEWS
    )
    summarize.DOC.write_text(doc)
    grid = [_record(f"grid@alpha={a}", 0, 0.8, val=v) for a, v in ((1, 0.5), (2, 0.7), (3, 0.6))]
    _write(tmp_path / "results/vgg11-main", [_record("baseline", 0, 0.8), _record("sgs", 0, 0.8)])
    _write(tmp_path / "results/vgg11-ablation", grid)
    assert summarize.main() == 0
    out = summarize.DOC.read_text()
    assert "old" not in out and out.count("text ") == len(summarize.VIEWS)
    ablation = out.split("<!-- view:ablation -->")[1].split("<!-- /view:ablation -->")[0]
    assert "Chosen on validation: **grid@alpha=2**" in ablation  # the highest val, 0.7
    assert "not run yet" in out.split("<!-- view:optim-adam -->")[1].split("<!-- /view")[0]
    assert (tmp_path / "results/views/ablation/report.md").is_file()
