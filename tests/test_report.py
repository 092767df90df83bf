"""report.md / summary.json numbers recomputed from results.json by independent formulas."""

from __future__ import annotations

import json
import math
import statistics
import sys

import numpy as np
import pytest

from gradshape.experiments import report

scipy_stats = pytest.importorskip("scipy.stats")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(method, seed, acc, seconds, *, k=None, params=1000, deployed=None, scalings=False):
    history = [
        {"epoch": e, "train_loss": 2.0 / (e + 1), "train_acc": acc - 0.1 + 0.05 * e,
         "val_acc": None, "test_acc": acc - 0.05 * (1 - e), "seconds": seconds / 2, "lr": 0.1}
        for e in range(2)
    ]  # fmt: skip
    g = [[0.5, 1.0, 0.5], [1.0, 3.0, 1.0], [0.5, 1.0, 0.5]]
    mag = {f"f.{i}": [[0.9, 1.0, 0.9], [1.0, 1.4 - 0.1 * i, 1.0], [0.9, 1.0, 0.9]] for i in (0, 3)}
    return {
        "method": method,
        "seed": seed,
        "k": k,
        "config": {
            "data": {"dataset": "digits", "subset": None, "pad_to": None, "val_fraction": 0.0},
            "model": {"name": "tiny", "width": 1.0, "drop_last_pool": False},
            "optim": {
                "name": "sgd",
                "lr": 0.1,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "epochs": 2,
                "batch_size": 64,
                "warmup_epochs": 1.0,
                "label_smoothing": 0.0,
            },
            "sgs": {
                "k": k or 5.0,
                "measure": "nmi",
                "mode": "gradient",
                "refresh_warmup": 1,
                "refresh_every": 1,
                "refresh_batches": 2,
            },
        },
        "test_acc": acc,
        "val_acc": None,
        "train_seconds": seconds,
        "params": params,
        "params_deployed": deployed or params,
        "history": history,
        "scalings": (
            {
                "history": [{"epoch": 1, "layers": {"f.0": g, "f.3": g}}],
                "final": {"f.0": g, "f.3": g},
            }
            if scalings
            else None
        ),
        "kernel_magnitude": mag,
    }


def _results(rng):
    records = []
    for seed in range(5):
        base = 0.85 + 0.02 * rng.standard_normal()
        records.append(_record("baseline", seed, base, 10 + rng.random()))
        records.append(
            _record("sgs", seed, base + 0.01 + 0.005 * rng.standard_normal(), 11 + rng.random(),
                    k=5.0, scalings=True)
        )  # fmt: skip
        records.append(
            _record("acb", seed, base + 0.003 * rng.standard_normal(), 25 + rng.random(),
                    params=1500, deployed=1100)
        )  # fmt: skip
    return records


def _write(tmp_path, records):
    (tmp_path / "results.json").write_text(json.dumps(records))
    return report.write_report(tmp_path)


def _t_interval(values):
    n = len(values)
    mean = statistics.fmean(values)
    half = scipy_stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, statistics.stdev(values), (mean - half, mean + half)


def test_summary_matches_independent_statistics(tmp_path):
    records = _results(np.random.default_rng(0))
    path = _write(tmp_path, records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["methods"]}
    assert list(rows) == ["baseline", "sgs", "acb"]
    by = {(r["method"], r["seed"]): r for r in records}
    base_time = statistics.fmean(by["baseline", s]["train_seconds"] for s in range(5))
    text = path.read_text()
    for method, row in rows.items():
        accs = [by[method, s]["test_acc"] for s in range(5)]
        mean, std, ci = _t_interval(accs)
        assert row["test_acc"]["n"] == 5
        assert row["test_acc"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert row["test_acc"]["std"] == pytest.approx(std, abs=1e-12)
        assert row["test_acc"]["ci"] == pytest.approx(ci, abs=1e-12)
        time = statistics.fmean(by[method, s]["train_seconds"] for s in range(5))
        assert row["time_ratio"] == pytest.approx(time / base_time, rel=1e-12)
        assert row["params"] == by[method, 0]["params"]
        assert row["params_deployed"] == by[method, 0]["params_deployed"]
        # the markdown shows the same numbers, in %
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in text
        assert f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" in text
        if method == "baseline":
            assert row["paired_diff"] is None
            continue
        diffs = [by[method, s]["test_acc"] - by["baseline", s]["test_acc"] for s in range(5)]
        d_mean, d_std, d_ci = _t_interval(diffs)
        assert row["paired_diff"]["mean"] == pytest.approx(d_mean, abs=1e-12)
        assert row["paired_diff"]["std"] == pytest.approx(d_std, abs=1e-12)
        assert row["paired_diff"]["ci"] == pytest.approx(d_ci, abs=1e-12)
        assert f"{100 * d_mean:+.2f}" in text
    assert "1,500 → 1,100" in text  # structural: training-time → deployed parameters


def test_paired_difference_uses_only_common_seeds(tmp_path):
    records = [
        _record("baseline", 0, 0.80, 1.0),
        _record("baseline", 1, 0.90, 1.0),
        _record("sgs", 1, 0.95, 2.0),
        _record("sgs", 2, 0.10, 2.0),  # no baseline for seed 2: not paired
    ]
    _write(tmp_path, records)
    sgs = json.loads((tmp_path / "summary.json").read_text())["methods"][1]
    assert sgs["paired_diff"]["n"] == 1
    assert sgs["paired_diff"]["mean"] == pytest.approx(0.05, abs=1e-12)
    assert sgs["paired_diff"]["ci"] is None and sgs["paired_diff"]["std"] is None
    assert sgs["test_acc"]["mean"] == pytest.approx(0.525, abs=1e-12)
    assert sgs["time_ratio"] == pytest.approx(2.0)


def test_records_from_two_comparisons_are_paired_by_seed(tmp_path):
    """A view over two folders (baseline in one, a method in the other) pairs their seeds."""
    base = [_record("baseline", s, 0.80 + 0.01 * s, 1.0) for s in range(3)]
    other = [_record("pgt", s, 0.81 + 0.03 * s * s, 1.5) for s in range(3)]
    report.write_report(tmp_path / "view", base + other)
    rows = {
        r["method"]: r for r in json.loads((tmp_path / "view/summary.json").read_text())["methods"]
    }
    diffs = [0.01 + 0.03 * s * s - 0.01 * s for s in range(3)]
    assert rows["pgt"]["paired_diff"]["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert rows["pgt"]["time_ratio"] == pytest.approx(1.5, rel=1e-12)
    assert not (tmp_path / "view/results.json").exists()  # the view does not copy the runs
    with pytest.raises(ValueError, match="no records"):
        report.write_report(tmp_path / "empty", [])


def test_single_seed_and_no_baseline_are_defined(tmp_path):
    path = _write(tmp_path, [_record("sgs", 0, 0.5, 3.0, k=5.0)])
    row = json.loads((tmp_path / "summary.json").read_text())["methods"][0]
    assert row["test_acc"] == {"n": 1, "mean": 0.5, "std": None, "ci": None}
    assert row["paired_diff"] is None and row["time_ratio"] is None
    line = next(x for x in path.read_text().splitlines() if x.startswith("| sgs"))
    assert "| 50.00 | – | – | – |" in line


def test_t_quantile_fallback_matches_scipy(monkeypatch):
    expected = {df: float(scipy_stats.t.ppf(0.975, df)) for df in [*range(1, 41), 60, 200, 5000]}
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import now fails
    for df, t in expected.items():
        assert report.t_quantile(df) == pytest.approx(t, abs=1e-6), df
    with pytest.raises(ValueError, match="df"):
        report.t_quantile(0)


def test_plots_are_written_and_linked(tmp_path):
    records = _results(np.random.default_rng(1))
    for seed in range(3):  # a k sweep: accuracy against k
        for k in (1.0, 3.0):
            records.append(_record(f"sgs@k={k:g}", seed, 0.8 + 0.01 * k, 11.0, k=k))
    path = _write(tmp_path, records)
    text = path.read_text()
    for name in ("accuracy", "scalings_sgs", "kernel_magnitude", "accuracy_vs_k"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name}.png)" in text
    # learned G printed in the report
    assert "3.00" in text and "`f.0`" in text


def test_no_k_plot_for_a_single_k(tmp_path):
    _write(tmp_path, _results(np.random.default_rng(2)))
    assert not (tmp_path / "plots" / "accuracy_vs_k.png").exists()


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = _write(tmp_path, _results(np.random.default_rng(3)))
    assert "matplotlib is not installed" in path.read_text()
    assert (tmp_path / "summary.json").exists()


def test_bad_results_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        report.write_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        report.write_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps([{"method": "sgs", "seed": 0}]))
    with pytest.raises(ValueError, match=r"record 0 lacks \['history', 'params'"):
        report.write_report(tmp_path)


def test_chosen_layers_first_middle_last():
    assert report.chosen_layers(["a", "b"]) == ["a", "b"]
    assert report.chosen_layers([str(i) for i in range(13)]) == ["0", "6", "12"]
