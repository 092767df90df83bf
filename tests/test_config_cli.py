"""Config files on the command line: generated flags, --config / --print_config, config.yaml in
run and comparison folders, the study's parts as config files, bad input, live tracking."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradshape import cli
from gradshape.harness import train
from gradshape.harness.config import (
    OPTIMIZERS,
    RunConfig,
    dump_yaml,
    load_config_file,
    write_config_file,
)
from gradshape.harness.methods import resolve_method
from test_cli import QUICK, error_line

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = json.loads((Path(__file__).with_name("study_flags.json")).read_text())
TINY = [*QUICK, "--data.subset", "128", "--optim.epochs", "1"]  # a later flag wins


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- generated flags ---------------------------------------------------------------------------
def test_every_config_setting_has_a_flag_with_its_default():
    """Walk RunConfig's fields independently of the CLI: each is a flag, defaulting to the
    dataclass default, and setting it by flag reaches the RunConfig."""
    parser = cli._subparsers(cli.build_parser())["train"]
    by_dest = {a.dest: a for a in parser._actions}
    defaults = RunConfig().to_dict()
    for key, value in defaults.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for name, default in items:
            dest = key if name is None else f"{key}.{name}"
            assert dest in by_dest, dest
            assert by_dest[dest].default == default, dest
            assert by_dest[dest].help, dest
    cmd = cli.parse_command(["train", "--optim.name", "adamw", "--dyrep.interval", "3"])
    assert cmd.config.optim.name == "adamw" and cmd.config.dyrep.interval == 3


def test_choices_come_from_the_literal_types():
    parser = cli._subparsers(cli.build_parser())["compare"]
    text = parser.format_help()
    assert "{" + ",".join(OPTIMIZERS) + "}" in text
    assert "{nmi,autocorrelation}" in text


def test_bool_flag_without_a_value_means_true():
    cmd = cli.parse_command(["train", "--resume", "--model.drop_last_pool", "--progress", "false"])
    assert cmd.output.resume and cmd.config.model.drop_last_pool and not cmd.output.progress
    cmd = cli.parse_command(["train", "--data.augment", "false"])
    assert cmd.config.data.augment is False and cmd.output.resume is False


def test_compare_plan_spellings():
    cmd = cli.parse_command(["compare", "--methods", "baseline,sgs", "--k", "1,3", "--seeds", "2",
                             "--seed", "4"])  # fmt: skip
    assert cmd.methods == ["baseline", "sgs@k=1", "sgs@k=3"]
    assert cmd.seeds == [4, 5] and cmd.config.sgs.k == 1.0 and cmd.config.method == "baseline"
    cmd = cli.parse_command(["compare", "--methods", "[acb, grid@alpha=2]", "--seeds", "0,7"])
    assert cmd.methods == ["acb", "grid@alpha=2"] and cmd.seeds == [0, 7]
    cmd = cli.parse_command(["compare", "--methods", "sgs", "--k", "3"])
    assert cmd.methods == ["sgs"] and cmd.config.sgs.k == 3.0  # one k: set, not expanded


# ---- --config and --print_config -----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--method", "sgs+cdg", "--optim.weight_decay", "1e-5", "--data.pad_to", "32",
         "--amp", "false", "--sgs.diag_removal"],
        ["compare", "--methods", "baseline,sgs@k=3", "--k", "2,4", "--seeds", "0,3",
         "--optim.name", "adam", "--optim.lr", "0.001", "--logger", "tensorboard", "--jobs", "2"],
    ],
)  # fmt: skip
def test_print_config_round_trips(argv, tmp_path, capsys):
    assert cli.main([*argv, "--print_config"]) == 0
    printed = capsys.readouterr().out
    path = _yaml(tmp_path / "printed.yaml", printed)
    assert cli.main([argv[0], "--config", str(path), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    direct, again = cli.parse_command(argv), cli.parse_command([argv[0], "--config", str(path)])
    assert again.config == direct.config
    assert (again.methods, again.seeds, again.output) == (direct.methods, direct.seeds,
                                                          direct.output)  # fmt: skip
    # complete: every RunConfig setting is in the printed file (compare: all but the method)
    keys = set(load_config_file(path))
    assert {f.name for f in dataclasses.fields(RunConfig)} - keys <= {"method"}


def test_config_files_merge_in_order_and_flags_after_override(tmp_path):
    one = _yaml(tmp_path / "one.yaml", "optim:\n  lr: 0.1\n  epochs: 3\nsgs: {k: 2}\n")
    two = _yaml(tmp_path / "two.yaml", "optim:\n  lr: 0.2\n")
    cfg = cli.parse_command(["train", "--config", str(one), "--config", str(two)]).config
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.sgs.k) == (0.2, 3, 2.0)  # nested keys merge
    argv = ["train", "--config", str(one), "--config", str(two), "--optim.lr", "0.3"]
    assert cli.parse_command(argv).config.optim.lr == 0.3
    argv = ["train", "--optim.lr", "0.3", "--config", str(two)]  # the file comes after the flag
    assert cli.parse_command(argv).config.optim.lr == 0.2
    # one section from its own file
    data = _yaml(tmp_path / "data.yaml", "dataset: digits\nsubset: 100\n")
    cfg = cli.parse_command(["train", "--data", str(data), "--data.pad_to", "16"]).config
    assert (cfg.data.dataset, cfg.data.subset, cfg.data.pad_to) == ("digits", 100, 16)


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim:\n  lrr: 0.1\n", ["optim.lrr"]),
        ("optim:\n  lr: fast\n", ["optim.lr", "fast"]),
        ("optim:\n  lr: -1\n", ["optim.lr", "-1"]),
        ("optim:\n  name: sgdd\n", ["optim.name", "sgdd"]),
        ("methods: [baseline, fancy]\n", ["unknown method 'fancy'"]),
        ("seeds: [0, 0]\n", ["seeds", "distinct"]),
        ("optim: [1\n", []),
    ],
)
def test_bad_config_file_is_one_line_naming_file_and_key(text, expected, tmp_path, capsys):
    good = _yaml(tmp_path / "good.yaml", "optim:\n  lr: 0.2\n")
    bad = _yaml(tmp_path / "bad.yaml", text)
    argv = ["compare", "--config", str(good), "--config", str(bad), "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert f"config file {bad}:" in line
    assert all(e in line for e in expected), line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--optim.lr", "abc"], ["optim.lr", "abc"]),
        (["train", "--nope", "1"], ["--nope"]),
        (["train", "--method", "sgs+fancy"], ["unknown method 'fancy'"]),
        (["compare", "--seeds", "0"], ["--seeds"]),
        (["compare", "--k", "0,1"], ["k", "> 0"]),
        (["train", "--config", "/nonexistent/c.yaml"], ["/nonexistent/c.yaml"]),
    ],
)
def test_bad_flags_are_one_line(argv, expected, capsys):
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert all(e in line for e in expected), line


def test_without_jsonargparse_one_line_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # import fails as if not installed
    assert cli.main(["train", "--help"]) == 2
    assert "pip install 'gradshape[cli]'" in error_line(capsys)


# ---- config.yaml in run and comparison folders --------------------------------------------------
def test_run_folder_config_yaml_reruns_and_guards_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--method", "grid@alpha=2", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    saved = load_config_file(out / "config.yaml")
    assert saved == record["config"]  # the run's settings, the spec's override applied
    assert saved["method"] == "grid@alpha=2" and saved["grid"]["alpha"] == 2.0
    assert not list(out.glob(".*partial"))  # written atomically
    # the file alone trains the same run: resuming with it finds the finished run
    again = ["train", "--config", str(out / "config.yaml"), "--out", str(out), "--progress",
             "false", "--resume"]  # fmt: skip
    assert cli.main(again) == 0
    assert json.loads((out / "run.json").read_text()) == record
    capsys.readouterr()
    assert cli.main([*again, "--optim.lr", "0.2", "--sgs.k", "3"]) == 2
    line = error_line(capsys)
    assert "config.yaml" in line and "['optim.lr', 'sgs.k']" in line


def test_resume_without_config_yaml_checks_the_checkpoint(tmp_path):
    cfg = RunConfig.from_dict(cli.parse_command(["train", *TINY]).config.to_dict())
    train.train_run(cfg, tmp_path, progress=False)
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "run.json").unlink()  # a folder of before config.yaml, interrupted at the end
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, momentum=0.5))
    with pytest.raises(ValueError, match=r"checkpoint.pt: .*\['optim.momentum'\]"):
        train.train_run(changed, tmp_path, resume=True, progress=False)
    assert not (tmp_path / "config.yaml").exists()  # nothing written for a refused resume
    train.train_run(cfg, tmp_path, resume=True, progress=False)
    assert load_config_file(tmp_path / "config.yaml") == cfg.to_dict()


def test_comparison_config_yaml_report_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, "--methods", "baseline,grid", "--seeds", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    saved = load_config_file(out / "config.yaml")
    assert saved["methods"] == ["baseline", "grid"] and saved["seeds"] == [0]
    for name in ("baseline-seed0", "grid-seed0"):
        assert (out / "runs" / name / "config.yaml").exists()
    # the folder's config.yaml is a compare config that plans the same comparison
    again = cli.parse_command(["compare", "--config", str(out / "config.yaml")])
    first = cli.parse_command(argv)
    assert (again.config, again.methods, again.seeds) == (first.config, first.methods,
                                                          first.seeds)  # fmt: skip
    report = (out / "report.md").read_text()
    assert "## Configuration" in report and "- baseline\n- grid" in report
    # report reads the settings from config.yaml: change it and the report's settings follow
    write_config_file(out / "config.yaml", {**saved, "optim": {**saved["optim"], "lr": 0.125}})
    assert cli.main(["report", str(out)]) == 0
    assert "lr 0.125" in (out / "report.md").read_text()
    write_config_file(out / "config.yaml", saved)
    capsys.readouterr()
    # resuming with other shared settings is refused before anything trains
    assert cli.main([*argv, "--resume", "--optim.epochs", "2", "--methods", "baseline,sgs"]) == 2
    line = error_line(capsys)
    assert f"{out / 'config.yaml'}" in line and "['optim.epochs']" in line
    assert not (out / "runs" / "sgs-seed0").exists()
    # more methods with the same settings: allowed, and config.yaml follows the new plan
    assert cli.main([*argv, "--resume", "--methods", "baseline,grid,pgt"]) == 0
    assert load_config_file(out / "config.yaml")["methods"] == ["baseline", "grid", "pgt"]


def test_yaml_helpers_read_json_and_yaml(tmp_path):
    data = RunConfig(method="sgs@k=3").to_dict()
    assert load_config_file(_yaml(tmp_path / "a.yaml", dump_yaml(data))) == data
    # what dump_yaml writes without PyYAML (JSON) reads back exactly, small floats included
    data["optim"]["weight_decay"] = 1e-05
    assert load_config_file(_yaml(tmp_path / "b.yaml", json.dumps(data))) == data
    with pytest.raises(ValueError, match="b.yaml must hold a mapping"):
        load_config_file(_yaml(tmp_path / "b.yaml", "- 1\n- 2\n"))


# ---- the study's parts as config files ---------------------------------------------------------
def _parts() -> list[tuple[str, str]]:
    return [(s, p) for s in ("study", "converged") for p in SNAPSHOT[s]]


@pytest.mark.parametrize(("study", "part"), _parts())
def test_study_part_config_equals_its_old_flags(study, part, monkeypatch):
    """Each part's config files give exactly the RunConfig, methods and seeds that its flag
    string gave the CLI before (tests/study_flags.json), so --resume continues its runs."""
    monkeypatch.chdir(ROOT)
    folder = f"experiments/configs/{study}"
    cmd = cli.parse_command(
        ["compare", "--config", f"{folder}/common.yaml", "--config", f"{folder}/{part}.yaml"]
    )
    old = SNAPSHOT[study][part]
    # settings added since the snapshot take their defaults, as a resumed run's do
    expected = RunConfig.from_dict(old["config"]).to_dict()
    assert json.dumps(cmd.config.to_dict()) == json.dumps(expected)  # same values and types
    assert cmd.methods == old["methods"] and cmd.seeds == old["seeds"]


@pytest.mark.parametrize(("study", "part"), _parts())
def test_study_part_config_resumes_the_recorded_runs(study, part, monkeypatch):
    """Against the runs themselves: every run in the part's results.json passes the resume
    check with the config files' settings (read only; skipped for parts not run yet)."""
    monkeypatch.chdir(ROOT)
    results = ROOT / "experiments" / "results" / part / "results.json"
    if not results.exists():
        pytest.skip(f"{part} has no results yet")
    folder = f"experiments/configs/{study}"
    cmd = cli.parse_command(
        ["compare", "--config", f"{folder}/common.yaml", "--config", f"{folder}/{part}.yaml"]
    )
    for record in json.loads(results.read_text()):
        assert record["method"] in cmd.methods
        run = dataclasses.replace(cmd.config, method=record["method"], seed=record["seed"])
        train._check_same_settings(record["config"], resolve_method(run)[1], results)


def _logged_argv(log: Path) -> list[str]:
    """The arguments the stand-in logged last (converged.sh appends to a part's log)."""
    return json.loads(log.read_text().splitlines()[-1])


def _stub(tmp_path: Path) -> str:
    stub = tmp_path / "stub.py"
    stub.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    return f"{sys.executable} {stub}"


@pytest.mark.parametrize(("study", "script"), [("study", "study.sh"),
                                               ("converged", "converged.sh")])  # fmt: skip
def test_scripts_run_each_part_with_its_config(study, script, tmp_path, monkeypatch):
    """The scripts, with a stand-in for gradshape that logs its arguments: every part's command
    line plans what its old flags planned, with --resume and without progress output."""
    env = {**os.environ, "GS": _stub(tmp_path), "OUT": str(tmp_path / "out")}
    for var in ("SEEDS", "EPOCHS", "JOBS", "COMMIT_REPO"):
        env.pop(var, None)
    done = subprocess.run(["bash", str(ROOT / "experiments" / script)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    monkeypatch.chdir(ROOT)
    for part, old in SNAPSHOT[study].items():
        cmd = cli.parse_command(_logged_argv(tmp_path / "out" / part / "log.txt"))
        assert cmd.config.to_dict() == RunConfig.from_dict(old["config"]).to_dict()
        assert (cmd.methods, cmd.seeds, cmd.jobs) == (old["methods"], old["seeds"], old["jobs"])
        assert cmd.output.resume and not cmd.output.progress
        assert cmd.folder == tmp_path / "out" / part
    env["SEEDS"] = env["EPOCHS"] = "3"
    done = subprocess.run(["bash", str(ROOT / "experiments" / script), part], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    cmd = cli.parse_command(_logged_argv(tmp_path / "out" / part / "log.txt"))
    if study == "study":
        assert cmd.seeds == [0, 1, 2]
    else:
        assert cmd.config.optim.epochs == 3


def test_converged_commits_only_the_part_folder(tmp_path):
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "config", "user.email", "t@example.org"], check=True)
    subprocess.run([*git, "config", "user.name", "t"], check=True)
    (repo / "other.txt").write_text("staged, not the study's\n")
    subprocess.run([*git, "add", "other.txt"], check=True)
    env = {**os.environ, "GS": _stub(tmp_path), "OUT": str(repo / "results"),
           "COMMIT_REPO": str(repo)}  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "experiments" / "converged.sh"), "conv-lemma1"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "done: conv-lemma1" in done.stdout, done.stderr
    log = subprocess.run([*git, "log", "--name-only", "--format=%s"], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert log == ["Converged", "study:", "part", "conv-lemma1", "results/conv-lemma1/log.txt"]
    staged = subprocess.run([*git, "diff", "--cached", "--name-only"], capture_output=True,
                            text=True, check=True).stdout.split()  # fmt: skip
    assert staged == ["other.txt"]


# ---- live tracking ----------------------------------------------------------------------------
def test_heatmap_image_is_g_over_its_maximum_in_blocks():
    from gradshape.harness.tracking import heatmap_image

    g = np.array([[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 1.0]])
    image = heatmap_image(np.stack([g, g]))  # per-channel G: the mean over channels is g
    assert image.shape == (48, 48) and image.dtype == np.float32
    for i in range(3):
        for j in range(3):
            block = image[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
            assert np.all(block == np.float32(g[i, j] / 3.0))
    assert heatmap_image(np.ones((2, 2, 2, 3, 3, 3))) is None  # 3-D kernels: no picture


def test_tensorboard_logs_epochs_and_heatmaps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", *TINY, "--optim.epochs", "2", "--method", "sgs", "--logger", "tensorboard",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss/train")]
    assert [s for s, _ in loss] == [1, 2]
    for (_, value), h in zip(loss, record["history"]):
        assert value == pytest.approx(h["train_loss"], rel=1e-6)  # stored as float32
    lr = [e.value for e in events.Scalars("lr")]
    assert lr == pytest.approx([h["lr"] for h in record["history"]], rel=1e-6)
    test = [e.value for e in events.Scalars("accuracy/test")]
    assert test == pytest.approx([h["test_acc"] for h in record["history"]], rel=1e-6)
    refresh = [e.value for e in events.Scalars("time/refresh_seconds")]
    assert sum(refresh) == pytest.approx(record["refresh_seconds"], rel=1e-4, abs=1e-6)
    # G is measured at epoch 1 (refresh_warmup 1): one image per scaled layer, at step 2
    layers = sorted(record["scalings"]["final"])
    assert sorted(t.removeprefix("G/") for t in events.Tags()["images"]) == layers
    assert [e.step for e in events.Images(f"G/{layers[0]}")] == [2]


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    argv = ["train", *TINY, "--logger", "tensorboard", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "pip install 'gradshape[tensorboard]'" in error_line(capsys)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
