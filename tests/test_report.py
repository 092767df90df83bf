"""report.md / summary.json numbers recomputed from results.json by independent formulas."""

from __future__ import annotations

import json
import math
import statistics
import sys

import numpy as np
import pytest

from gradshape.harness import report

scipy_stats = pytest.importorskip("scipy.stats")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(method, seed, acc, seconds, *, k=None, params=1000, deployed=None, scalings=False,
            fit=None):  # fmt: skip
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
        "train_eval_acc": fit,
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


@pytest.fixture
def no_plots(monkeypatch):
    """Statistics-only tests skip the plots (as without matplotlib); plots are tested below."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


def _write(tmp_path, records):
    (tmp_path / "results.json").write_text(json.dumps(records))
    return report.write_report(tmp_path)


def _t_interval(values):
    n = len(values)
    mean = statistics.fmean(values)
    half = scipy_stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, statistics.stdev(values), (mean - half, mean + half)


def test_summary_matches_independent_statistics(tmp_path, no_plots):
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
        # the markdown shows the same numbers, in %, and no unpaired interval
        line = next(x for x in text.splitlines() if x.startswith(f"| {method} |"))
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in line
        assert f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" not in text
        if method == "baseline":
            assert row["paired_diff"] is None
            continue
        diffs = [by[method, s]["test_acc"] - by["baseline", s]["test_acc"] for s in range(5)]
        d_mean, d_std, d_ci = _t_interval(diffs)
        assert row["paired_diff"]["mean"] == pytest.approx(d_mean, abs=1e-12)
        assert row["paired_diff"]["std"] == pytest.approx(d_std, abs=1e-12)
        assert row["paired_diff"]["ci"] == pytest.approx(d_ci, abs=1e-12)
        assert row["paired_by_seed"] == [{"seed": s, "diff": d} for s, d in enumerate(diffs)]
        assert f"| {100 * d_mean:+.2f} | [{100 * d_ci[0]:+.2f}, {100 * d_ci[1]:+.2f}] |" in line
    assert "1,500 → 1,100" in text  # structural: training-time → deployed parameters


def test_paired_difference_uses_only_common_seeds(tmp_path, no_plots):
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


def test_records_from_two_comparisons_are_paired_by_seed(tmp_path, no_plots):
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


def test_single_seed_and_no_baseline_are_defined(tmp_path, no_plots):
    path = _write(tmp_path, [_record("sgs", 0, 0.5, 3.0, k=5.0)])
    row = json.loads((tmp_path / "summary.json").read_text())["methods"][0]
    assert row["test_acc"] == {"n": 1, "mean": 0.5, "std": None, "ci": None}
    assert row["paired_diff"] is None and row["time_ratio"] is None
    line = next(x for x in path.read_text().splitlines() if x.startswith("| sgs"))
    assert line.startswith("| sgs | 1 | 50.00 | – | – | 3.0 | – |")


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
    for name in ("accuracy", "paired_differences", "scalings_sgs", "kernel_magnitude",
                 "accuracy_vs_k"):  # fmt: skip
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name}.png)" in text
    # learned G printed in the report
    assert "3.00" in text and "`f.0`" in text


def test_no_k_plot_for_a_single_k(tmp_path):
    records = _results(np.random.default_rng(2))
    assert report.plot_accuracy_vs_k(records, tmp_path / "k.png") is None
    assert not (tmp_path / "k.png").exists()


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


# ---- paired statistics -------------------------------------------------------------------
def test_paired_interval_by_hand_is_what_the_table_shows():
    # d = (1, 2, 3) points: mean 2, s = 1; t_{0.975, 2} = 4.302652729911275, so the paired
    # interval is 2 ± 4.3027/√3 = [-0.48, +4.48] points, while the accuracies themselves
    # spread over 20 points between seeds (an unpaired interval would be ~25 points wide)
    base = [0.50, 0.60, 0.70]
    records = [_record("baseline", s, b, 1.0) for s, b in enumerate(base)]
    records += [_record("sgs", s, b + 0.01 * (s + 1), 1.0) for s, b in enumerate(base)]
    summary = report.summarize_records(records)
    diff = summary["methods"][1]["paired_diff"]
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert diff["mean"] == pytest.approx(0.02, abs=1e-12)
    assert diff["std"] == pytest.approx(0.01, abs=1e-12)
    assert diff["ci"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-12)
    assert "| sgs | 3 | 62.00 ± 11.00 | +2.00 | [-0.48, +4.48] |" in report.table(summary)
    assert report.paired_differences(records, "sgs") == pytest.approx(
        {0: 0.01, 1: 0.02, 2: 0.03}, abs=1e-12
    )


def test_fit_and_gap_statistics(tmp_path, no_plots):
    rng = np.random.default_rng(4)
    records = []
    for seed in range(4):
        acc = 0.8 + 0.01 * rng.standard_normal()
        records.append(_record("baseline", seed, acc, 1.0, fit=acc + 0.05 + 0.01 * rng.random()))
    records.append(_record("old", 0, 0.7, 1.0))  # written before train_eval_acc existed
    path = _write(tmp_path, records)
    rows = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())["methods"]}
    runs = records[:4]
    expected = {
        "train_eval_acc": [r["train_eval_acc"] for r in runs],
        "gap": [r["train_eval_acc"] - r["test_acc"] for r in runs],
        "last_train_acc": [r["history"][-1]["train_acc"] for r in runs],
        "running_gap": [r["history"][-1]["train_acc"] - r["test_acc"] for r in runs],
    }
    for key, values in expected.items():
        mean, std, ci = _t_interval(values)
        assert rows["baseline"][key]["mean"] == pytest.approx(mean, abs=1e-12), key
        assert rows["baseline"][key]["std"] == pytest.approx(std, abs=1e-12), key
        assert rows["baseline"][key]["ci"] == pytest.approx(ci, abs=1e-12), key
    assert rows["old"]["train_eval_acc"] is None and rows["old"]["gap"] is None
    assert rows["old"]["running_gap"]["mean"] == pytest.approx(0.7 - 0.1 + 0.05 - 0.7, abs=1e-12)
    text = path.read_text().split("## Fit and generalisation")[1]
    line = next(x for x in text.splitlines() if x.startswith("| baseline |"))
    mean, _, ci = _t_interval(expected["gap"])
    assert f"| {100 * mean:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] |" in line
    assert f"| {100 * statistics.fmean(expected['train_eval_acc']):.2f} |" in line
    old = next(x for x in text.splitlines() if x.startswith("| old |"))
    assert old.startswith("| old | 1 | – | 70.00 | – | 65.00 | -5.00 |")


# ---- plots -------------------------------------------------------------------------------
def _gappy(method, seed, accs, fit):
    """Four epochs evaluated only at epochs 1 and 3 (counted from 0), as --eval-every 2."""
    record = _record(method, seed, accs[-1], 4.0, fit=fit)
    record["history"] = [
        {"epoch": e, "train_loss": 1.5 - 0.3 * e + 0.01 * seed, "train_acc": 0.5 + 0.1 * e
         + 0.01 * seed, "val_acc": None, "test_acc": accs[e // 2] if e % 2 else None,
         "seconds": 1.0, "lr": 0.1}
        for e in range(4)
    ]  # fmt: skip
    return record


def test_learning_curves_skip_epochs_without_evaluation(tmp_path):
    records = [_gappy("baseline", s, (0.60 + 0.01 * s, 0.70 + 0.02 * s), 0.9) for s in range(3)]
    records += [_gappy("sgs", s, (0.62, 0.71 + 0.01 * s), 0.95 + 0.01 * s) for s in range(3)]
    fig = report.plot_learning_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    ax_train, ax_test, ax_loss = fig.axes
    for method in ("baseline", "sgs"):
        runs = [r for r in records if r["method"] == method]
        (test,) = [line for line in ax_test.get_lines() if line.get_label() == method]
        assert list(test.get_xdata()) == [2, 4]  # epochs trained when evaluated, no zeros
        for x, y in zip(test.get_xdata(), test.get_ydata(), strict=True):
            values = [r["history"][x - 1]["test_acc"] for r in runs]
            assert y == pytest.approx(100 * statistics.fmean(values), abs=1e-12)
        (train,) = [line for line in ax_train.get_lines() if line.get_label() == method]
        assert list(train.get_xdata()) == [1, 2, 3, 4]
        (loss,) = [line for line in ax_loss.get_lines() if line.get_label() == method]
        assert loss.get_ydata().tolist() == pytest.approx(
            [statistics.fmean(r["history"][e]["train_loss"] for r in runs) for e in range(4)]
        )
        fit = [line for line in ax_train.get_lines() if line.get_marker() == "x"
               and line.get_color() == train.get_color()]  # fmt: skip
        assert fit[0].get_xdata().tolist() == [4]
        assert fit[0].get_ydata()[0] == pytest.approx(
            100 * statistics.fmean(r["train_eval_acc"] for r in runs), abs=1e-12
        )
    # the band is ± one sample std over seeds at the evaluated epochs
    band = ax_test.collections[0].get_paths()[0].vertices[:, 1]
    ends = [[r["history"][e]["test_acc"] for r in records[:3]] for e in (1, 3)]
    low = min(100 * (statistics.fmean(v) - statistics.stdev(v)) for v in ends)
    high = max(100 * (statistics.fmean(v) + statistics.stdev(v)) for v in ends)
    assert band.min() == pytest.approx(low, abs=1e-9) and band.max() == pytest.approx(high)
    assert "3 seeds" in fig.get_suptitle()
    # a report over such runs is written too
    path = report.write_report(tmp_path / "report", records)
    assert "](plots/accuracy.png)" in path.read_text()


def test_kernel_picture_accepts_the_three_shapes_of_g():
    rng = np.random.default_rng(5)
    w = rng.random((4, 2, 3, 3))  # (c_out, c_in/groups, kh, kw)
    by_loop = sum(w[o, i] for o in range(4) for i in range(2)) / 8
    np.testing.assert_allclose(report.kernel_picture(w), by_loop, rtol=1e-14)
    np.testing.assert_allclose(
        report.kernel_picture(w[:, 0]), sum(w[o, 0] for o in range(4)) / 4, rtol=1e-14
    )
    np.testing.assert_array_equal(report.kernel_picture(w[0, 0].tolist()), w[0, 0])
    # 1-D kernels are a row; given per channel, the kernel's rank must be said
    assert report.kernel_picture([1.0, 2.0, 3.0]).tolist() == [[1.0, 2.0, 3.0]]
    np.testing.assert_allclose(
        report.kernel_picture(w[:, :, 0], kernel_ndim=1), [by_loop[0]], rtol=1e-14
    )
    assert report.kernel_picture(rng.random((2, 2, 3, 3, 3)), kernel_ndim=3) is None
    assert report.kernel_picture(rng.random((2, 2, 2, 3, 3))) is None  # more than K + 2 dims


def _assert_texts_inside(fig):
    """Every title and the suptitle lie inside the figure (none is cut off at its edges)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [ax.title for ax in fig.axes if ax.get_title()] + [t for t in fig.texts if t.get_text()]
    assert texts
    for text in texts:
        box, page = text.get_window_extent(renderer), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, text.get_text()


def _assert_no_text_overlaps(fig):
    """No title, row label or suptitle overlaps a heatmap other than the one it labels."""
    _assert_texts_inside(fig)
    renderer = fig.canvas.get_renderer()
    maps = [ax for ax in fig.axes if ax.images]
    boxes = {ax: ax.get_window_extent(renderer) for ax in maps}
    labels = [(ax, t) for ax in maps for t in (ax.title, ax.yaxis.label) if t.get_text()]
    labels += [(None, t) for t in fig.texts if t.get_text()]
    for owner, text in labels:
        box = text.get_window_extent(renderer)
        for ax, other in boxes.items():
            assert ax is owner or not box.overlaps(other), (text.get_text(), ax.get_ylabel())


def _images(fig):
    return [im for ax in fig.axes for im in ax.images]


def test_g_heatmaps_average_seeds_on_one_colour_scale(tmp_path):
    rng = np.random.default_rng(6)
    shapes = {"f.0": (3, 3), "f.3": (4, 3, 3), "f.6": (4, 2, 3, 3)}  # the three shapes of G
    records, g = [], {}
    for seed in range(3):
        r = _record("sgs", seed, 0.8, 1.0, k=5.0, scalings=True)
        g[seed] = {e: {n: 0.5 + 5 * rng.random(s) for n, s in shapes.items()} for e in (1, 2)}
        r["scalings"] = {
            "history": [{"epoch": e, "layers": {n: a.tolist() for n, a in g[seed][e].items()}}
                        for e in (1, 2)],
            "final": {n: a.tolist() for n, a in g[seed][2].items()},
        }  # fmt: skip
        r["kernel_magnitude"] = {n: np.ones((3, 3)).tolist() for n in shapes}
        records.append(r)
    fig = report.plot_scalings(records, "sgs", tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    images = _images(fig)
    assert len(images) == 6  # 3 layers × 2 refreshes
    expected = []
    for i, name in enumerate(shapes):
        for j, e in enumerate((1, 2)):
            lead = tuple(range(len(shapes[name]) - 2))
            mean = np.mean([g[s][e][name].mean(axis=lead) if lead else g[s][e][name]
                            for s in range(3)], axis=0)  # fmt: skip
            np.testing.assert_allclose(images[2 * i + j].get_array(), mean, rtol=1e-12)
            expected.append(mean)
    everything = np.concatenate([m.ravel() for m in expected])
    assert {im.get_clim() for im in images} == {(everything.min(), everything.max())}
    assert "3 seeds" in fig.get_suptitle()
    _assert_no_text_overlaps(fig)
    # the report's text block shows the same seed means
    text = report.scalings_text(records)
    assert "mean over 3 seeds" in text
    assert f"{expected[-1][1, 1]:5.2f}" in text
    # a fixed G (no refresh) is one column: a narrow figure whose title must still fit
    fixed = {**records[0], "method": "grid", "scalings": {"history": [], "final": g[0][1]}}
    fixed["scalings"]["final"] = {n: a.tolist() for n, a in g[0][1].items()}
    fig = report.plot_scalings([fixed], "grid", tmp_path / "fixed.png")
    assert [ax.get_title() for ax in fig.axes if ax.images][:1] == ["fixed"]
    assert "fixed (never refreshed)" in fig.get_suptitle().replace("\n", " ")
    _assert_no_text_overlaps(fig)


def test_kernel_magnitude_heatmap_averages_seeds_on_one_scale(tmp_path):
    rng = np.random.default_rng(7)
    records = _results(rng)
    for r in records:
        r["kernel_magnitude"] = {f"f.{i}": (0.8 + 0.4 * rng.random((3, 3))).tolist()
                                 for i in range(5)}  # fmt: skip
    records.append({**_record("old", 0, 0.5, 1.0), "kernel_magnitude": None})  # not pictured
    fig = report.plot_kernel_magnitude(records, tmp_path / "k.png")
    images = _images(fig)
    methods, layers = ["baseline", "sgs", "acb"], ["f.0", "f.2", "f.4"]
    assert len(images) == len(methods) * len(layers)
    for i, m in enumerate(methods):
        runs = [r for r in records if r["method"] == m]
        for j, layer in enumerate(layers):
            mean = sum(np.asarray(r["kernel_magnitude"][layer]) for r in runs) / len(runs)
            np.testing.assert_allclose(images[3 * i + j].get_array(), mean, rtol=1e-12)
    arrays = [np.asarray(im.get_array()) for im in images]
    clim = (min(a.min() for a in arrays), max(a.max() for a in arrays))
    assert {im.get_clim() for im in images} == {clim}
    assert [ax.get_ylabel() for ax in fig.axes if ax.images][::3] == [
        f"{m}\n(5 seeds)" for m in methods
    ]
    _assert_no_text_overlaps(fig)


def test_paired_difference_plot_shows_each_seed_and_the_t_interval(tmp_path):
    records = _results(np.random.default_rng(8))
    fig = report.plot_paired_differences(records, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sgs", "acb"]
    points = [line for line in ax.get_lines() if line.get_marker() == "o"]
    for i, method in enumerate(["sgs", "acb"]):
        diffs = [
            next(r for r in records if r["method"] == method and r["seed"] == s)["test_acc"]
            - next(r for r in records if r["method"] == "baseline" and r["seed"] == s)["test_acc"]
            for s in range(5)
        ]
        ys = sorted(line.get_ydata()[0] for line in points if round(line.get_xdata()[0]) == i)
        assert ys == pytest.approx(sorted(100 * d for d in diffs), abs=1e-12)
        mean, _, ci = _t_interval(diffs)
        container = ax.containers[i]
        assert container.lines[0].get_ydata()[0] == pytest.approx(100 * mean, abs=1e-12)
        (segment,) = container.lines[2][0].get_segments()
        assert segment[:, 1] == pytest.approx([100 * ci[0], 100 * ci[1]], abs=1e-12)
    _assert_texts_inside(fig)
    # one method on request (a narrow figure); none without a shared seed
    _assert_texts_inside(report.plot_paired_differences(records, tmp_path / "e.png", ["acb"]))
    alone = [_record("baseline", 0, 0.5, 1.0), _record("sgs", 1, 0.6, 1.0)]
    assert report.plot_paired_differences(alone, tmp_path / "f.png") is None
    with pytest.raises(ValueError, match="'sgs' shares no seed with 'baseline'"):
        report.plot_paired_differences(alone, tmp_path / "f.png", ["sgs"])


def _k_records(with_baseline: bool):
    records = []
    for seed in range(4):
        level = 0.70 + 0.05 * seed  # a large shared seed effect: pairing removes it
        if with_baseline:
            records.append(_record("baseline", seed, level, 1.0))
        for k in (1.0, 3.0):
            records.append(_record(f"sgs@k={k:g}", seed, level + 0.001 * k * (seed + 1), 1.0, k=k))
        records.append(_record("sgs@mode=update", seed, level, 1.0, k=5.0))  # another family
    return records


def test_accuracy_vs_k_shows_paired_intervals(tmp_path):
    records = _k_records(with_baseline=True)
    fig = report.plot_accuracy_vs_k(records, tmp_path / "k.png")
    (ax,) = fig.axes
    (container,) = ax.containers  # sgs@mode=update has one k: no line of its own
    assert container.lines[0].get_xdata().tolist() == [1.0, 3.0]
    for i, k in enumerate((1.0, 3.0)):
        diffs = [0.001 * k * (s + 1) for s in range(4)]
        mean, _, ci = _t_interval(diffs)
        assert container.lines[0].get_ydata()[i] == pytest.approx(100 * mean, abs=1e-9)
        segment = container.lines[2][0].get_segments()[i]
        assert segment[:, 1] == pytest.approx([100 * ci[0], 100 * ci[1]], abs=1e-9)
    assert "paired" in ax.get_title() and "Δ" in ax.get_ylabel()
    # without a baseline: the accuracies with their unpaired interval, and the title says so
    fig = report.plot_accuracy_vs_k(_k_records(with_baseline=False), tmp_path / "u.png")
    (ax,) = fig.axes
    accs = [0.70 + 0.05 * s + 0.001 * (s + 1) for s in range(4)]
    mean, _, ci = _t_interval(accs)
    assert ax.containers[0].lines[0].get_ydata()[0] == pytest.approx(100 * mean, abs=1e-9)
    assert ax.containers[0].lines[2][0].get_segments()[0][:, 1] == pytest.approx(
        [100 * ci[0], 100 * ci[1]], abs=1e-9
    )
    assert "unpaired" in ax.get_title()
