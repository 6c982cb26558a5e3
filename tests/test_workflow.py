"""The real `snakemake` on a tiny study in a temp directory: every output, MLflow's runs, and bad-input errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_study import FINISHED_STUDY, copy_finished_study, snakemake, tiny_study, write_config

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
TINY = tiny_study(lrs=(0.05, 0.1), epochs=EPOCHS)
FINISHED = FINISHED_STUDY["studies"]["tiny"]  # what the `tiny_study` fixture holds, finished
assert FINISHED["train"]["epochs"] == EPOCHS
TINY_RUNS = [(m, lr) for m in FINISHED["methods"] for lr in FINISHED["lrs"]]
EPOCH_METRICS = ("lr", "train_loss", "train_robust_acc", "val_clean_acc", "val_pgd_acc", "test_clean_acc",
                 "test_pgd_acc", "images_per_s", "epoch_time_s")


@pytest.fixture(scope="module")
def tiny_study(finished_tiny_study, tmp_path_factory):
    """A private copy of the session's finished study (conftest.py), Snakemake's metadata and file times included."""
    workdir = tmp_path_factory.mktemp("workflow") / "study"
    copy_finished_study(finished_tiny_study, workdir)
    return workdir


@pytest.mark.slow
def test_a_fresh_run_prints_no_warning(tiny_study):
    """Issue 26.8: training jobs wrote the study's tracking file, the output of rule mlflow_study, first; Snakemake
    then warned that the rule's output "was not present when the DAG was created" and deleted it."""
    output = (tiny_study / "snakemake_output.txt").read_text()
    assert "Warning" not in output and "were not present when the DAG was created" not in output, output[-3000:]


@pytest.mark.slow
def test_every_expected_output_exists(tiny_study):
    manifest = json.loads((tiny_study / "results/studies/tiny/manifest.json").read_text())
    assert len(manifest["runs"]) == len(TINY_RUNS)
    for run in manifest["runs"]:
        run_dir = tiny_study / run["dir"]
        for name in ("metrics.json", "best.pt", "last.pt", "mlflow_run_id"):
            assert (run_dir / name).is_file(), run_dir / name
        assert not (run_dir / "running").exists()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "complete" and len(metrics["epochs"]) == EPOCHS
        assert (metrics["config"]["method"], metrics["config"]["lr"]) == (run["method"], run["lr"])
        evaluation = json.loads((tiny_study / run["eval"]).read_text())
        for checkpoint in ("best", "last"):
            for key in ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc"):
                assert 0 <= evaluation["checkpoints"][checkpoint][key] <= 1
        assert (tiny_study / "results/logs/train" / f"{run['dir'].removeprefix('results/runs/')}.log").is_file()
    tables = {p.name for p in (tiny_study / "results/tables/tiny").iterdir()}
    for stem in ("table2_pgd10_best", "table2_clean_last", "table3_correlation", "table4_paired_ttest"):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv"} <= tables
    figures = list((tiny_study / "results/figures/tiny").glob("*.png"))
    assert figures and all(f.stat().st_size > 0 for f in figures)
    assert (tiny_study / "results/data/mnist5k.json").is_file()


@pytest.mark.slow
def test_mlflow_holds_one_child_run_per_grid_point_with_every_epoch(tiny_study):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny_study}/results/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("deat")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("deat.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == len(TINY_RUNS) and len(runs) == 1 + len(TINY_RUNS)
    for child in children:
        assert child.info.status == "FINISHED"
        # The name ends in the directory's settings hash; the run lists its study and its process.
        run_dir = child.data.tags["deat.run_dir"]
        assert child.info.run_name.endswith(f" · {run_dir.split('/')[-2]}")
        assert child.data.tags["deat.studies"] == "tiny"
        assert {"deat.host", "deat.pid", "deat.lock_file"} <= set(child.data.tags)
        assert {"method", "lr", "batch_size", "seed", "eps", "pgd_steps"} <= set(child.data.params)
        # Each method's own options only: momentum is SGD-momentum's, k1 DEAT's.
        own, other = ("momentum", "k1") if child.data.params["method"] == "pgd_at" else ("k1", "momentum")
        assert own in child.data.params and other not in child.data.params
        for key in EPOCH_METRICS:
            history = client.get_metric_history(child.info.run_id, f"epoch/{key}")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
        assert "eval/best/aa_acc" in child.data.metrics and "eval/last/pgd_acc" in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"metrics.json", "config.json", "learning_curves.png"} <= artifacts
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"tables", "figures"} <= parent_artifacts


@pytest.mark.slow
def test_snakemakes_report_holds_every_figure_table_and_log_with_its_caption(tiny_study):
    import html
    import zipfile

    report = tiny_study / "report.zip"
    result = snakemake(tiny_study, "--report", str(report), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(report) as archive:
        # report/data/raw/<id>/<path inside the reported directory>
        stored = {name.split("/data/raw/")[1].split("/", 1)[1]: archive.read(name) for name in archive.namelist()
                  if "/data/raw/" in name and not name.endswith("/")}
        page = archive.read("report/report.html").decode()
    figures = sorted((tiny_study / "results/figures/tiny").glob("*.png"))
    tables = sorted((tiny_study / "results/tables/tiny").glob("*.csv"))
    logs = sorted((tiny_study / "results/logs/train").rglob("*.log"))
    assert figures and len(tables) > 5 and len(logs) == len(TINY_RUNS)
    for path in figures + tables + [tiny_study / "results/tables/tiny/protocol.md"]:
        assert stored.get(path.name) == path.read_bytes(), path  # the file itself, byte for byte
    for path in logs + sorted((tiny_study / "results/logs/evaluate").rglob("*.log")):
        assert stored.get(str(path.relative_to(tiny_study / "results/logs"))) == path.read_bytes(), path
    # Each table is shown with the caption the report wrote in its .md, and each figure names its study's protocol.
    for table in tables:
        if table.stem != "runs":
            caption = (table.with_suffix(".md")).read_text().split("**")[1]
            # as it sits in the page's JSON: HTML-escaped by docutils, then ASCII-escaped by json.dumps
            assert any(json.dumps(text)[1:-1] in page for text in (caption, html.escape(caption, quote=False))), table
    assert page.count("Protocol: mnist5k; architectures small_cnn; methods pgd_at, deat;") == len(figures)
    assert "ERROR/" not in page and "WARNING/" not in page  # no docutils complaint rendered into a caption


@pytest.mark.slow
def test_rerun_has_nothing_to_do(tiny_study):
    result = snakemake(tiny_study, "--cores", "2", "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_sweep_trains_every_variant_and_shares_what_a_method_does_not_read(tmp_path):
    """sweep: {k1: [...]} adds a grid axis; PGD-AT does not read k1, so its runs are shared across the variants."""
    config = json.loads(json.dumps(TINY))
    config["studies"]["tiny"]["sweep"] = {"k1": [0.5, 1.0]}
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", "results/studies/tiny/manifest.json", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "results/studies/tiny/manifest.json").read_text())
    assert manifest["protocol"]["k1"] == [0.5, 1.0]
    runs = manifest["runs"]
    assert len(runs) == 2 * 2 * 2  # lrs × methods × k1
    assert {(r["method"], r["sweep"]["k1"]) for r in runs} == {(m, k) for m in ("pgd_at", "deat") for k in (0.5, 1.0)}
    assert len({r["dir"] for r in runs if r["method"] == "deat"}) == 4
    assert len({r["dir"] for r in runs if r["method"] == "pgd_at"}) == 2
    dry_run = snakemake(tmp_path, "--cores", "1", "-n", timeout=120)
    assert re.search(r"^train\s+6$", dry_run.stdout, re.MULTILINE), dry_run.stdout[-2000:]



def test_per_method_lrs_train_only_each_methods_own(tmp_path):
    config = json.loads(json.dumps(TINY))
    config["studies"]["tiny"]["lrs"] = {"pgd_at": [0.05], "deat": [0.05, 0.1]}
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", "results/studies/tiny/manifest.json", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "results/studies/tiny/manifest.json").read_text())["runs"]
    assert [(r["method"], r["lr"]) for r in runs] == [("pgd_at", 0.05), ("deat", 0.05), ("deat", 0.1)]
    config["studies"]["tiny"]["lrs"] = {"deat": [0.1]}
    write_config(tmp_path / "bad", config)
    result = snakemake(tmp_path / "bad", "--cores", "1", "-n", timeout=120)
    assert result.returncode != 0
    assert "studies.tiny.lrs: a mapping needs one list per method of `methods` ['pgd_at', 'deat'], got ['deat']" in (
        result.stdout + result.stderr)


# The equal-step pairs config.yaml's matched studies promise: PGD-AT α -> DEAT α.
MATCHED_PAIRS = {"matched_sgd_momentum": {0.01: 0.2236, 0.02: 0.4472, 0.1: 2.236, 0.2: 4.472},
                 "matched_sgd_plain": {0.1: 0.2236, 0.2236: 0.5, 0.5: 1.118, 1.118: 2.5, 2.5: 5.59}}


def test_matched_studies_pair_every_pgd_at_point_with_a_deat_run_of_equal_step_and_decay(tmp_path):
    from deat.effective import effective_decay, effective_step

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    targets = [f"results/studies/{study}/manifest.json" for study in MATCHED_PAIRS]
    result = snakemake(tmp_path, "--cores", "1", *targets, "--config", f"run=[{','.join(MATCHED_PAIRS)}]",
                       timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for study, pairs in MATCHED_PAIRS.items():
        manifest = json.loads((tmp_path / f"results/studies/{study}/manifest.json").read_text())
        protocol = manifest["protocol"]
        momentum, k1, wd = protocol["pgd_at_momentum"], protocol["k1"], protocol["weight_decay"]

        def step_and_decay(run):
            decoupled = run.get("sweep", {}).get("decoupled_weight_decay", protocol["decoupled_weight_decay"])
            return (effective_step(run["method"], run["lr"], momentum, k1),
                    effective_decay(run["method"], run["lr"], momentum, k1, wd, decoupled))

        runs = {(r["method"], r["lr"], r["seed"], r.get("sweep", {}).get("decoupled_weight_decay")): r
                for r in manifest["runs"]}
        coupled = False if "sweep" in manifest["runs"][0] else None
        for seed in protocol["seeds"]:
            for pgd_lr, deat_lr in pairs.items():
                pgd = step_and_decay(runs[("pgd_at", pgd_lr, seed, coupled)])
                deat = step_and_decay(runs[("deat", deat_lr, seed, coupled)])
                assert deat == pytest.approx(pgd, rel=0.01), (study, pgd_lr, deat_lr)  # the report's 1 % rule
    # PGD-AT's best α in small_lr_sweep (0.1, effective step 1.0) is paired, and the decoupled ablation is not
    # matched in decay: the same step, √5 times the decay.
    assert effective_step("pgd_at", 0.1, 0.9, 1.0) == pytest.approx(1.0)
    ablation = json.loads((tmp_path / "results/studies/matched_sgd_momentum/manifest.json").read_text())["runs"]
    assert any(r["method"] == "deat" and r["lr"] == 2.236 and r["sweep"]["decoupled_weight_decay"] for r in ablation)
    assert effective_decay("deat", 2.236, 0.9, 1.0, 5e-4, True) == pytest.approx(
        5 ** 0.5 * effective_decay("pgd_at", 0.1, 0.9, 1.0, 5e-4, False), rel=1e-3)

@pytest.mark.slow
def test_gpu_study_script_runs_the_workflows_commands_without_snakemake_and_archives_the_json(tmp_path):
    """benchmarks/gpu_study.sh: plan with Snakemake here, run where only torch is (here: DEVICE=cpu), unpack."""
    import tarfile

    shutil.copy(REPO / "Snakefile", tmp_path)
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    write_config(tmp_path, FINISHED_STUDY)  # 2 runs
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "DEVICE": "cpu",
           "OUT": str(tmp_path / "returned")}
    script = str(REPO / "benchmarks" / "gpu_study.sh")
    plan = subprocess.run(["bash", script, "plan", "tiny", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "planned 2 training and 2 evaluation jobs of study tiny, 2 at a time" in plan.stdout, plan.stderr
    commands = (tmp_path / ".bench_data/gpu_study/train.txt").read_text()
    assert "--mlflow" not in commands and commands.count("--device cpu") == 2
    run = subprocess.run(["bash", script, "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "2 metrics.json, 2 eval files archived" in run.stdout
    manifest = json.loads((tmp_path / "results/studies/tiny/manifest.json").read_text())
    with tarfile.open(tmp_path / "returned/gpu_study.tgz") as archive:
        names = set(archive.getnames())
    assert {entry["eval"] for entry in manifest["runs"]} <= names
    assert not [name for name in names if name.endswith((".pt", ".partial.json"))]


def _bad(study_changes: dict, top_changes: dict | None = None) -> dict:
    config = json.loads(json.dumps(TINY))
    config["studies"]["tiny"].update(study_changes)
    config.update(top_changes or {})
    return config


@pytest.mark.parametrize("config, expected", [
    (_bad({"archs": ["resnet50"]}), "studies.tiny.archs[0]: 'resnet50' is not allowed; expected one of "
                                    "preact_resnet18, senet18, vgg19, wrn34_10, small_cnn"),
    (_bad({"methods": ["pgd-at"]}), "studies.tiny.methods[0]: 'pgd-at' is not allowed (did you mean 'pgd_at'?)"),
    (_bad({"dataset": "cifar-10"}), "studies.tiny.dataset: 'cifar-10' is not allowed (did you mean 'cifar10'?); "
                                    "expected cifar10 | cifar100 | svhn | cifar10_small | mnist5k | npz:<path>"),
    (_bad({"lrs": [-0.1]}), "studies.tiny.lrs[0]: -0.1 is less than or equal to the minimum of 0"),
    (_bad({"lrs": []}), "studies.tiny.lrs: [] should be non-empty"),
    (_bad({"epochs": 3}), "studies.tiny.epochs: unknown key (a `python -m deat train` option: put it under train:)"),
    (_bad({"train": {"epoch": 3}}), "studies.tiny.train.epoch: unknown key (did you mean 'epochs'?); allowed here: "
                                    "any `python -m deat train` option but the grid axes: val_size, augment, width"),
    (_bad({"train": {"k2": 1.5}}), "studies.tiny.train: k2=1.5 is invalid; expected 0 <= k2 < 1"),
    (_bad({"methods": ["trades", "mart"], "train": {"awp_gamma": 0.005}}),
     "awp_gamma=0.005 is invalid; expected 0 for method mart"),
    (_bad({"train": {"lr": 0.1}}), "studies.tiny.train.lr: cannot be set here; the study's grid sets it (lrs: [...])"),
    (_bad({"train": {"device": "cpu"}}), "studies.tiny.train.device: cannot be set in a study; set `device:` at the "
                                         "top level of the config"),
    (_bad({}, {"run": ["tinyy"]}), "run: unknown study 'tinyy' (did you mean 'tiny'?); defined studies: tiny"),
    (_bad({}, {"colour": "blue"}), "colour: unknown key; allowed here: run, device, runs_per_gpu, data_root, mlflow, "
                                   "studies"),
    (_bad({"lrs": ["fast"]}), "studies.tiny.lrs[0]: 'fast' is not of type 'number'"),
    (_bad({"seeds": [0.5]}), "studies.tiny.seeds[0]: 0.5 is not of type 'integer'"),
    (_bad({"batch_sizes": 128}), "studies.tiny.batch_sizes: 128 is not of type 'array'"),
    (_bad({"train": {"epochs": "ten"}}), "studies.tiny.train: epochs: expected an integer, got 'ten'"),
    (_bad({"train": {"eps": -0.1}}), "eps=-0.1 is invalid"),
    (_bad({"train": {"pgd_steps": -1}}), "pgd_steps=-1 is invalid"),
    (_bad({"eval": {"n_examples": 0}}), "studies.tiny.eval.n_examples: 0 is less than the minimum of 1"),
    (_bad({"eval": {"n_exampels": 9}}), "studies.tiny.eval.n_exampels: unknown key (did you mean 'n_examples'?)"),
    (_bad({}, {"runs_per_gpu": 0}), "runs_per_gpu: 0 is less than the minimum of 1"),
    (_bad({}, {"mlflow": {"tracking_uri": "ftp://host"}}), "mlflow.tracking_uri: 'ftp://host' is not allowed; "
                                                           "expected sqlite:///path (embedded store)"),
    (_bad({"dataset": "npz:/nope.npz"}), "studies.tiny.dataset: npz file /nope.npz does not exist"),
    (_bad({"sweep": {"k2": [0.8, 1.5]}}), "k2=1.5 is invalid; expected 0 <= k2 < 1"),
    (_bad({"sweep": {"lr": [0.1]}}), "studies.tiny.sweep.lr: cannot be swept here; the study's grid sets it (lrs"),
    (_bad({"sweep": {"eps": [0.1]}}), "studies.tiny.sweep.eps: also set in studies.tiny.train; set it in one place"),
    (_bad({"sweep": {"log_interval_s": [1, 2]}}), "studies.tiny.sweep.log_interval_s: cannot be swept; it does not "
                                                  "change what a run computes"),
    (_bad({"sweep": {"k1": []}}), "studies.tiny.sweep.k1: [] should be non-empty"),
])
def test_bad_config_stops_before_any_job_in_one_line_and_writes_nothing(tmp_path, config, expected):
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", timeout=120)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: ") and expected in lines[0], lines
    assert not (tmp_path / "results").exists()


def test_a_typo_in_a_study_key_is_one_line_naming_the_study_and_the_key_it_meant(tmp_path):
    """Issue 26: `batch_size:` for `batch_sizes:` printed jsonschema's 152-line dump, the study nowhere in it."""
    config = json.loads(json.dumps(TINY))
    config["studies"]["tiny"]["batch_size"] = config["studies"]["tiny"].pop("batch_sizes")
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", "-n", timeout=120)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "config error: studies.tiny.batch_size: unknown key (did you mean 'batch_sizes'?); allowed here: "
        "description, dataset, archs, methods, lrs, batch_sizes, seeds, paper_reference, train, sweep, eval"]
    assert result.stdout == ""


def test_several_problems_are_a_line_each_and_train_lists_only_what_it_allows(tmp_path):
    config = _bad({"train": {"epoch": 3, "batch_size": 64, "lr": 0.1, "eps": 0.1}})
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", "-n", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 3, lines
    assert lines[0].startswith("config error: studies.tiny.train.batch_size: cannot be set here; the study's grid "
                               "sets it (batch_sizes: [...])")
    assert "studies.tiny.train.epoch: unknown key (did you mean 'epochs'?)" in lines[1]
    allowed = lines[1].split("allowed here: any `python -m deat train` option but the grid axes: ")[1].split(", ")
    assert "epochs" in allowed and "k1" in allowed
    assert not set(allowed) & {"lr", "arch", "method", "seed", "batch_size", "dataset", "out", "device", "data_root"}
    assert lines[2].startswith("config error: studies.tiny.train.lr: cannot be set here")


# ------------------------------------------------------------------------------ the README's own commands

def readme_block(after: str, language: str = "bash") -> str:
    """The first fenced block of `language` after the line containing `after` in README.md."""
    text = (REPO / "README.md").read_text()
    rest = text[text.index(after):]
    start = rest.index(f"```{language}\n") + len(f"```{language}\n")
    return rest[start:rest.index("```", start)]


def readme_custom_study_commands() -> list[str]:
    commands = [line.split("#")[0].strip() for line in readme_block("## Studies").splitlines()]
    commands += [line.split("#")[0].strip() for line in readme_block("## Overriding the grid").splitlines()]
    return [c for c in commands if "my_study.yaml" in c]


def test_the_readme_shows_its_custom_study_commands():
    assert readme_custom_study_commands() == [
        "snakemake --cores all --configfile my_study.yaml",
        "snakemake --cores all --config run=[mine] --configfile my_study.yaml"]
    assert readme_block("## Overriding the grid", "yaml").startswith("# my_study.yaml\nstudies:\n  mine:\n")


@pytest.mark.parametrize("command", readme_custom_study_commands())
def test_the_readme_custom_study_commands_build_the_file_s_study(tmp_path, command):
    """Issue 26: `snakemake --cores all --configfile my_study.yaml` (no `run:` in the file) printed "Nothing to be
    done": run stayed [quick]. Each README command, as written (plus -n), schedules study `mine` and nothing else."""
    import shlex

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "my_study.yaml").write_text(readme_block("## Overriding the grid", "yaml"))
    argv = shlex.split(command)
    assert argv[0] == "snakemake"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *argv[1:],
                             "-n"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^train\s+8$", result.stdout, re.MULTILINE), result.stdout[-2000:]  # 2 methods x 2 lrs x 2 seeds
    assert re.search(r"^report\s+1$", result.stdout, re.MULTILINE)
    assert "results/tables/mine" in result.stdout and "results/tables/quick" not in result.stdout
    if "run=" not in command:
        assert "note: building the studies my_study.yaml defines: run=[mine]" in result.stderr


def test_an_explicit_run_leaves_the_file_s_other_studies_with_a_note_naming_the_flag(tmp_path):
    write_config(tmp_path, TINY)
    other = {"studies": {"extra": TINY["studies"]["tiny"]}}
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(other))
    result = snakemake(tmp_path, "--cores", "1", "-n", "--config", "run=[tiny]", "--configfile",
                       str(tmp_path / "extra.yaml"), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "extra.yaml defines extra, which run=[tiny] does not build; to build it too: --config run=[tiny,extra]" in (
        result.stderr)


def test_unlock_prints_no_resume_note_and_a_run_command_does(tmp_path):
    """Issue 26.8: the note about interrupted runs is for a command that runs (or dry-runs) the workflow."""
    write_config(tmp_path, TINY)
    (tmp_path / "results/runs/mnist5k/small_cnn/deat/0123abcd/lr0.3_bs8_seed0/running").mkdir(parents=True)
    unlock = snakemake(tmp_path, "--unlock", timeout=120)
    assert unlock.returncode == 0 and "note:" not in unlock.stdout + unlock.stderr, unlock.stderr
    dry_run = snakemake(tmp_path, "--cores", "1", "-n", timeout=120)
    assert dry_run.returncode == 0
    assert dry_run.stderr.count("note: 1 interrupted run(s) belong to no study of run=['tiny']") == 1
