"""The ``gradshape`` command end to end on digits: every output file, help, and clean errors."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys

import pytest

from gradshape import cli
from gradshape.harness.methods import METHODS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = [
    "--data.dataset", "digits", "--data.subset", "256", "--model.name", "tiny",
    "--optim.epochs", "2", "--optim.batch_size", "32", "--optim.lr", "0.05",
    "--sgs.refresh_every", "1", "--sgs.refresh_batches", "2", "--device", "cpu",
    "--progress", "false",
]  # fmt: skip


def error_line(capsys) -> str:
    """The one line a failed command wrote to stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gradshape: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    argv = ["compare", *QUICK, "--methods", "baseline,sgs,acb", "--k", "1,5", "--seeds", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    return out, argv


def test_compare_writes_every_output(comparison):
    out, _ = comparison
    records = json.loads((out / "results.json").read_text())
    methods = ["baseline", "sgs@k=1", "sgs@k=5", "acb"]
    assert sorted((r["method"], r["seed"]) for r in records) == sorted(
        (m, s) for m in methods for s in (0, 1)
    )
    for r in records:
        assert len(r["history"]) == 2
        assert 0 <= r["test_acc"] <= 1 and r["train_seconds"] > 0 and r["params"] > 0
        assert r["config"]["data"]["dataset"] == "digits"
        assert (out / "runs" / f"{r['method']}-seed{r['seed']}" / "run.json").exists()
        assert (out / "runs" / f"{r['method']}-seed{r['seed']}" / "checkpoint.pt").exists()
        if r["flags"]["needs_refresh"]:
            assert r["k"] == r["config"]["sgs"]["k"] == float(r["method"].split("=")[1])
            assert [h["epoch"] for h in r["scalings"]["history"]] == [1]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["seed"])) for r in rows] == [
        (r["method"], r["seed"]) for r in records
    ]
    text = (out / "report.md").read_text()
    for png in ("accuracy", "scalings_sgs_k_1", "scalings_sgs_k_5", "kernel_magnitude",
                "accuracy_vs_k"):  # fmt: skip
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{png}.png)" in text
    for m in methods:
        assert f"| {m} | 2 |" in text


def test_compare_refuses_existing_folder_then_resumes_and_overwrites(comparison, capsys):
    out, argv = comparison
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in error_line(capsys)
    before = json.loads((out / "results.json").read_text())
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0  # all finished: nothing rerun
    assert json.loads((out / "results.json").read_text()) == before


def test_report_regenerates_from_results(comparison, capsys):
    out, _ = comparison
    (out / "report.md").unlink()
    (out / "plots" / "accuracy.png").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert "| baseline | 2 |" in capsys.readouterr().out
    assert (out / "report.md").exists() and (out / "plots" / "accuracy.png").exists()


def test_train_writes_run_record(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--method", "sgs+pgt", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "sgs+pgt" and (out / "checkpoint.pt").exists()
    assert record["flags"]["loss_transform"] and record["flags"]["needs_refresh"]
    assert f"{100 * record['test_acc']:.2f}%" in capsys.readouterr().out
    assert cli.main(["train", *QUICK, "--method", "sgs+pgt", "--out", str(out)]) == 2
    assert "already holds a run" in error_line(capsys)


def test_unknown_method_lists_the_valid_ones(tmp_path, capsys):
    argv = ["compare", *QUICK, "--methods", "baseline,fancy", "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "unknown method 'fancy'" in line
    assert all(name in line for name in METHODS)
    assert not (tmp_path / "x").exists()  # nothing trained, nothing written


def test_missing_data_path_says_what_is_expected(tmp_path, capsys):
    argv = ["train", "--data.dataset", "fashion-mnist", "--data.path", str(tmp_path / "nowhere"),
            "--out", str(tmp_path / "run"), "--progress", "false"]  # fmt: skip
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "train-images-idx3-ubyte" in line
    assert "apt-get install dataset-fashion-mnist" in line


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_is_explained_in_help(capsys):
    for parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest}"
        text = parser.format_help()
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
    assert "sgs-autocorr" in capsys.readouterr().out  # the methods are listed


def test_python_dash_m_gradshape():
    done = subprocess.run(
        [sys.executable, "-m", "gradshape", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "compare" in done.stdout
