"""experiments/summarize.py: views pair runs of several comparison folders, or refuse to."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from gradshape.harness.data import _split, make_loader

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
                "test_acc": acc, "seconds": 1.0, "lr": 0.1, "images": 100}]  # fmt: skip
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
        f"text {name}\n<!-- {kind}:{name} -->\nOLD-TEXT\n<!-- /{kind}:{name} -->\n"
        for kind, names in (
            ("view", [*summarize.VIEWS, *summarize.TABLES]),
            ("protocol", summarize.PROTOCOLS),
        )
        for name in names
    )
    summarize.DOC.write_text(doc)
    grid = [_record(f"grid@alpha={a}", 0, 0.8, val=v) for a, v in ((1, 0.5), (2, 0.7), (3, 0.6))]
    _write(tmp_path / "results/vgg11-main", [_record("baseline", 0, 0.8), _record("sgs", 0, 0.8)])
    _write(tmp_path / "results/vgg11-ablation", grid)
    assert summarize.main() == 0
    out = summarize.DOC.read_text()
    assert "OLD-TEXT" not in out
    expected = len(summarize.VIEWS) + len(summarize.TABLES) + len(summarize.PROTOCOLS)
    assert out.count("text ") == expected
    ablation = out.split("<!-- view:ablation -->")[1].split("<!-- /view:ablation -->")[0]
    assert "Chosen on validation: **grid@alpha=2**" in ablation  # the highest val, 0.7
    assert "not run yet" in out.split("<!-- view:optim-adam -->")[1].split("<!-- /view")[0]
    assert (tmp_path / "results/views/ablation/report.md").is_file()
    # the main view adds its gap table and links its plots; the protocol lists missing parts
    main = out.split("<!-- view:main-vgg11 -->")[1].split("<!-- /view")[0]
    assert "| fit acc % (train images, eval mode) |" in main
    for png in ("accuracy", "paired_differences"):
        assert (tmp_path / f"results/views/main-vgg11/plots/{png}.png").is_file()
        assert f"(experiments/results/views/main-vgg11/plots/{png}.png)" in main
    protocol = out.split("<!-- protocol:short -->")[1].split("<!-- /protocol")[0]
    assert "from the 5 runs" in protocol and "Not run yet: `resnet18-main`" in protocol


def test_refresh_rules_that_agree_still_pair(summarize, tmp_path):
    old = _record("baseline", 0, 0.8)  # written before refresh_align existed
    new = _record("cdg", 0, 0.8, sgs__refresh_align="paper")
    _write(tmp_path / "results/vgg11-main", [old, _record("sgs", 0, 0.8)])
    _write(tmp_path / "results/vgg11-transforms", [new])
    assert len(summarize.view_records("transforms")) == 3  # every = 1: both rules agree
    # every 5 after a warm-up of 1: "paper" refreshes at 1, 5, 10, "warmup" at 1, 6, 11
    main = [_record(m, 0, 0.8, sgs__refresh_every=5, sgs__refresh_align="warmup")
            for m in ("baseline", "sgs")]  # fmt: skip
    update = _record("sgs@mode=update", 0, 0.8, sgs__refresh_every=5, sgs__refresh_align="paper")
    (tmp_path / "results/vgg11-main/results.json").write_text(json.dumps(main))
    _write(tmp_path / "results/optim-sgd", [update])
    with pytest.raises(ValueError, match="optim-sgd.*cannot be paired"):
        summarize.view_records("optim-sgd")
    # a method that sets its own schedule (G measured once: frozen) still pairs
    frozen = _record("sgs@refresh_every=1000", 0, 0.8, sgs__refresh_every=1000,
                     sgs__refresh_align="warmup")  # fmt: skip
    (tmp_path / "results/optim-sgd/results.json").write_text(json.dumps([frozen]))
    assert len(summarize.view_records("optim-sgd")) == 3


# ---- the protocol, derived -------------------------------------------------------------------
def test_accuracy_denominator_recovers_the_image_count(summarize):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 60_000, size=20)
    assert summarize.accuracy_denominator([int(c) / 60_000 for c in counts]) == 60_000
    assert summarize.accuracy_denominator([3 / 7, None, 5 / 14]) == 14
    assert summarize.accuracy_denominator([None]) is None


def _run(method, seed, *, images, batch, epochs, val, test, refreshed=(), evaluated=None):
    """A run record whose accuracies are whole counts out of ``val`` and ``test`` images."""
    rng = np.random.default_rng(seed)
    record = _record(method, seed, 0.5, optim__batch_size=batch, optim__warmup_epochs=1.0)
    record["history"] = []
    for e in range(epochs):
        shown = evaluated is None or e in evaluated
        record["history"].append(
            {"epoch": e, "train_loss": 1.0, "train_acc": 0.5, "images": images,
             "val_acc": int(rng.integers(1, val)) / val if shown else None,
             "test_acc": int(rng.integers(1, test)) / test if shown else None,
             "seconds": 1.0, "lr": 0.1, "refreshed": e in refreshed}
        )  # fmt: skip
    record["test_acc"] = record["history"][-1]["test_acc"]
    record["val_acc"] = record["history"][-1]["val_acc"]
    return record


def test_protocol_facts_from_runs_with_known_counts(summarize):
    shape = {"images": 37, "batch": 8, "epochs": 3, "val": 23, "test": 53}
    runs = [_run("baseline", s, **shape, evaluated=(1, 2)) for s in range(3)]
    runs += [_run("sgs", s, **shape, refreshed=(1, 2), evaluated=(1, 2)) for s in range(3)]
    facts = summarize.protocol_facts(runs)
    # the loader's own batch count for 37 images in batches of 8
    loader = make_loader(TensorDataset(torch.zeros(37)), 8, shuffle=True, seed=0)
    steps = len(loader)
    assert dict(facts["steps_per_epoch"]) == {steps: 6}
    assert dict(facts["steps"]) == {3 * steps: 6}
    assert dict(facts["warmup_steps"]) == {steps: 6}  # one warm-up epoch
    assert dict(facts["last_batch"]) == {37 - 8 * (steps - 1): 6}
    assert dict(facts["train_images"]) == {37: 6}
    assert dict(facts["val_images"]) == {23: 6} and dict(facts["test_images"]) == {53: 6}
    assert dict(facts["refresh_epochs"]) == {"1, 2": 3}
    assert dict(facts["scaled_steps"]) == {2 * steps: 3}
    assert dict(facts["evaluation"]) == {"at the end of epochs 1, 2 (counted from 0)": 6}
    text = summarize.protocol_markdown(facts, ["part"], intervals=4)
    assert f"{steps} steps per epoch (the last batch holds 5 images), 3 epochs" in text
    assert "measured on 23 images and test accuracy on 53" in text
    assert "The 3 runs that refresh G do so at the start of epochs 1, 2" in text
    assert "show 4 distinct paired 95 % intervals" in text
    # runs that differ are each named with their count
    runs.append(_run("baseline", 9, **{**shape, "epochs": 2}))
    text = summarize.protocol_markdown(summarize.protocol_facts(runs), ["part"])
    assert ", 2 (1 runs) or 3 (6 runs) epochs," in text


def test_intervals_shared_by_views_count_once(summarize):
    base = [_record("baseline", s, 0.80 + 0.01 * s) for s in range(3)]
    sgs = [_record("sgs", s, 0.81 + 0.02 * s) for s in range(3)]
    cdg = [_record("cdg", s, 0.79 + 0.01 * s * s) for s in range(3)]
    single = [_record("pgt", 0, 0.7)]  # one seed: no interval
    views = {"a": base + sgs, "b": base + sgs + cdg + single}
    assert summarize.count_intervals(views) == 2
    # a view paired against another method than the baseline counts against that method
    acb = [_record("acb", s, 0.80 + 0.02 * s) for s in range(3)]
    views["conv-lemma1"] = [dict(r, method="branch") for r in sgs] + acb
    summarize.REFERENCES["conv-lemma1"] = "acb"
    assert summarize.count_intervals(views) == 3


@pytest.mark.parametrize("study", ["short", "converged"])
def test_committed_protocol_block_matches_the_runs(study):
    """EXPERIMENTS.md's protocol states what the committed results.json files hold."""
    spec = importlib.util.spec_from_file_location("study_summarize_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parts = {p for v in module.PROTOCOLS[study] for p in module.view_parts(v)}
    present = [p for p in parts if (module.RESULTS / p / "results.json").is_file()]
    if study == "short" and len(present) < len(parts):
        pytest.skip("the short study's results are not all committed")
    views = {v: module.view_records(v) for v in module.PROTOCOLS[study]}
    block = module.DOC.read_text().split(f"<!-- protocol:{study} -->\n")[1].split("\n<!-- /")[0]
    assert block == module._protocol_body(study, views)
    # the same numbers another way: the code's split of Fashion-MNIST's 60,000 training
    # images, and the warm-up steps the scheduler took (first lr = lr / steps of one epoch)
    records = [r for p in present for r in module.load_results(module.RESULTS / p)]
    for r in records[:: max(1, len(records) // 10)]:
        d = r["config"]["data"]
        train_idx, val_idx = _split(60_000, val_fraction=d["val_fraction"], subset=d["subset"],
                                    seed=r["seed"], name="fashion-mnist")  # fmt: skip
        assert f"trains on {len(train_idx):,} images per epoch" in block
        assert f"measured on {len(val_idx):,} images" in block
        warmup = round(r["config"]["optim"]["lr"] / r["history"][0]["lr"])
        assert f"warms up over the first {warmup} steps" in block
        assert f"{warmup} steps per epoch" in block  # one warm-up epoch


def test_learning_rate_table_pairs_each_rate_within_its_part(summarize, tmp_path):
    low = [_record("baseline", s, a) for s, a in ((0, 0.80), (1, 0.82))]
    low += [_record("sgs", s, a) for s, a in ((0, 0.81), (1, 0.84))]
    _write(tmp_path / "results/conv-lr-0.025", low)
    table = summarize.lr_markdown().splitlines()
    assert table[2].startswith("| 0.025 | 2 | 81.00 | 82.50 | +1.50 | [")
    # paired t-interval of the differences 1.0 and 2.0 points: 1.5 ± t(0.975, 1)·0.5
    half = 12.706204736174698 * 0.5
    assert f"[{1.5 - half:+.2f}, {1.5 + half:+.2f}]" in table[2]
    assert table[3] == "| 0.05 | *(not run yet)* | | | | |"


def test_rate_effect_pairs_each_method_with_itself_on_common_seeds(summarize, tmp_path):
    main = [_record("baseline", s, a) for s, a in ((0, 0.80), (1, 0.82), (2, 0.90))]
    main += [_record("sgs", s, a) for s, a in ((0, 0.81), (1, 0.83), (2, 0.90))]
    _write(tmp_path / "results/conv-main", main)
    low = [_record("baseline", s, a, optim__lr=0.025) for s, a in ((0, 0.78), (1, 0.81))]
    low += [_record("sgs", s, a, optim__lr=0.025) for s, a in ((0, 0.81), (1, 0.83))]
    _write(tmp_path / "results/conv-lr-0.025", low)
    effects = {(lr, m): d for lr, m, d in summarize.rate_effects()}
    assert set(effects) == {(0.025, "baseline"), (0.025, "sgs")}
    # seed 2 ran only at 0.05 and is left out: differences -2 and -1 points, then 0 and 0
    base, sgs = effects[(0.025, "baseline")], effects[(0.025, "sgs")]
    assert base["n"] == 2 and base["mean"] == pytest.approx(-0.015, abs=1e-12)
    half = 12.706204736174698 * 0.005
    assert base["ci"] == pytest.approx((-0.015 - half, -0.015 + half), abs=1e-9)
    assert sgs["mean"] == pytest.approx(0.0, abs=1e-12)
    assert "| 0.025 | baseline | 2 | -1.50 | [" in summarize.lr_markdown()
