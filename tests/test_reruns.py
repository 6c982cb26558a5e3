"""Safe reruns: what a rerun of a finished or interrupted study does, and what it must never do.

The rules (docs/reliability.md): an edit that does not change what a run computes never retrains it; changing an
evaluation setting re-evaluates only; no rerun deletes a finished checkpoint; MLflow's status tells the truth
whatever ends a process; the README's resume commands resume every interrupted job. Each Snakemake case runs the
real snakemake on a tiny PGD-AT study in a temporary directory: `-n` where the dry run proves the point, a real run
where files must survive.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_reliability import TRAIN, deat, job_env, snakemake, wait_until, write_config
from tiny_study import FINISHED_STUDY, copy_finished_study, forget_run, tiny_study

from deat.checkpoint import save_checkpoint, write_json
from deat.config import TrainConfig, run_identity

REPO = Path(__file__).resolve().parents[1]
# The session's finished study narrowed to its PGD-AT run, with a k1 that PGD-AT does not read.
PGD_AT_STUDY = copy.deepcopy(FINISHED_STUDY)
PGD_AT_STUDY["studies"]["tiny"].update(methods=["pgd_at"], description="A tiny PGD-AT study.")
PGD_AT_STUDY["studies"]["tiny"]["train"]["k1"] = 0.5
TRAINING_RULES = {"train", "evaluate", "prepare_dataset"}


def rules_in(output: str) -> set[str]:
    """The rules snakemake's output names as scheduled (a dry run) or run (`localrule` in a real local run)."""
    return {line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith(("rule ", "localrule "))}


def scheduled_rules(workdir: Path, *args: str) -> set[str]:
    """The rules a dry run would execute."""
    result = snakemake(workdir, "--cores", "2", "-n", *args, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return rules_in(result.stdout)


def edit_config(workdir: Path, edit) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    edit(config)
    write_config(workdir, config)


def checkpoint_stats(workdir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every checkpoint: a file deleted and rewritten, even identically, changes both."""
    return {str(p.relative_to(workdir)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((workdir / "results/runs").rglob("*.pt"))}


def mlflow_runs(workdir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("deat")
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def finished_study(finished_tiny_study, tmp_path_factory) -> Path:
    """PGD_AT_STUDY, finished: a copy of the session's finished study without its DEAT run (directory, logs and
    MLflow run deleted), rerun under PGD_AT_STUDY's config. That rerun rewrites the study's manifest and tables and
    must train and evaluate nothing: the PGD-AT run's identity leaves k1 out."""
    workdir = copy_finished_study(finished_tiny_study, tmp_path_factory.mktemp("finished") / "study")
    forget_run(workdir, "deat")
    write_config(workdir, PGD_AT_STUDY)
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    ran = rules_in(result.stdout + result.stderr)
    assert "report" in ran and not ran & TRAINING_RULES, ran
    return workdir


@pytest.fixture
def study(finished_study, tmp_path) -> Path:
    """A private copy of the finished study (mtimes, Snakemake's metadata and the MLflow store included)."""
    workdir = tmp_path / "study"
    copy_finished_study(finished_study, workdir)
    return workdir


# ------------------------------------------------------------------------------------------ run identity

def test_run_identity_leaves_out_what_the_method_does_not_read():
    pgd_at = TrainConfig(method="pgd_at").resolved().to_dict()
    deat_run = TrainConfig(method="deat").resolved().to_dict()
    assert run_identity({**pgd_at, "k1": 2.0, "k2": 0.1, "decoupled_weight_decay": False}) == run_identity(pgd_at)
    assert run_identity({**deat_run, "momentum": 0.5}) == run_identity(deat_run)
    assert run_identity({**pgd_at, "momentum": 0.5}) != run_identity(pgd_at)
    assert run_identity({**deat_run, "k1": 2.0}) != run_identity(deat_run)
    assert run_identity({**pgd_at, "device": "cuda", "out": "x", "cudnn_benchmark": True}) == run_identity(pgd_at)
    # A run written before an option existed: the option counts as its default.
    older = {k: v for k, v in pgd_at.items() if k != "compile"}
    assert run_identity(older) == run_identity(pgd_at)


# ------------------------------------------------------------------------------- what a rerun schedules

@pytest.mark.slow
@pytest.mark.parametrize("edit", [
    pytest.param(lambda c: c["studies"]["tiny"].update(description="Reworded entirely."), id="description"),
    pytest.param(lambda c: c["studies"]["tiny"]["train"].update(k1=2.0), id="k1-in-a-pgd-at-study"),
    pytest.param(lambda c: c.update(device="auto", runs_per_gpu=2), id="device-and-runs-per-gpu"),
    pytest.param(lambda c: c.update(run=["tiny", "other"], studies={**c["studies"], "other": {
        **c["studies"]["tiny"], "description": "Another study sharing every run."}}), id="a-second-study"),
])
def test_edits_that_do_not_change_what_a_run_computes_never_retrain_or_reevaluate(study, edit):
    edit_config(study, edit)
    assert not scheduled_rules(study) & TRAINING_RULES


@pytest.mark.slow
def test_changing_an_evaluation_setting_reevaluates_and_reports_but_never_trains(study):
    edit_config(study, lambda c: c["studies"]["tiny"]["eval"].update(pgd_steps=4))
    rules = scheduled_rules(study)
    assert "evaluate" in rules and "report" in rules and "train" not in rules


@pytest.mark.slow
def test_an_option_the_method_ignores_changes_nothing_in_a_real_rerun(study):
    """Issue 12, case 2: k1 0.5 -> 2.0 in a PGD-AT study once deleted the checkpoints, then failed in MLflow."""
    before = checkpoint_stats(study)
    metrics = sorted((study / "results/runs").rglob("metrics.json"))
    contents = [p.read_bytes() for p in metrics]
    edit_config(study, lambda c: c["studies"]["tiny"]["train"].update(k1=2.0))
    result = snakemake(study, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_stats(study) == before
    assert [p.read_bytes() for p in metrics] == contents
    assert {r.info.status for r in mlflow_runs(study)} == {"FINISHED"}
    assert all("k1" not in r.data.params for r in mlflow_runs(study) if r.data.tags.get("deat.role") == "grid_point")


@pytest.mark.slow
def test_forceall_retrains_nothing_and_keeps_every_checkpoint(study):
    before = checkpoint_stats(study)
    result = snakemake(study, "--cores", "2", "--forceall")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_stats(study) == before
    for log in (study / "results/logs/train").rglob("*.log"):
        assert "metrics.json written again from it, nothing trained" in log.read_text()
    for metrics in (study / "results/runs").rglob("metrics.json"):
        assert json.loads(metrics.read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_fresh_clone_of_committed_results_is_reported_not_retrained(study):
    """Committed evidence is JSON only: no checkpoints, no MLflow store, no Snakemake metadata, and file times are
    checkout times (an evaluation may look older than its metrics.json). Nothing may be trained or evaluated again:
    the runs have no checkpoints to train on from, and their committed files would be deleted first."""
    shutil.rmtree(study / ".snakemake")
    shutil.rmtree(study / "results/mlflow")
    (study / "results/studies/tiny/mlflow.json").unlink()  # ignored by git, like the store
    for path in (study / "results/runs").rglob("*"):
        if path.suffix == ".pt" or path.name == "mlflow_run_id":
            path.unlink()
        elif path.name.startswith("eval_") and path.suffix == ".json":
            os.utime(path, (0, 0))
    assert scheduled_rules(study) <= {"mlflow_store", "mlflow_study", "report", "all"}
    shutil.rmtree(study / "results/tables")  # the report (and the MLflow rules it waits for) can still be rebuilt
    assert scheduled_rules(study) == {"mlflow_store", "mlflow_study", "report", "all"}


@pytest.mark.slow
def test_committed_runs_without_their_evaluation_are_reported_not_evaluated_from_nothing(study):
    """A committed run whose evaluation was never run (a GPU budget ran out) or whose study now asks another
    evaluation has no checkpoint to evaluate: the workflow must not schedule an evaluation that can only fail,
    must say which runs and how to get them evaluated, and must still write the study's tables."""
    for path in (study / "results/runs").rglob("*.pt"):
        path.unlink()
    never_evaluated = sorted((study / "results/runs").rglob("eval_*.json"))[0]
    never_evaluated.unlink()
    result = snakemake(study, "--cores", "2", "-n", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule evaluate" not in result.stdout and "rule train" not in result.stdout
    assert ("note: 1 finished run(s) of study tiny have neither the evaluation it asks "
            f"({never_evaluated.name}) nor checkpoints") in result.stderr
    assert str(never_evaluated.parent.relative_to(study)) in result.stderr
    assert "delete their metrics.json" in result.stderr

    edit_config(study, lambda c: c["studies"]["tiny"]["eval"].update(pgd_steps=7))  # every run: a new evaluation
    result = snakemake(study, "--cores", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = len(list((study / "results/runs").rglob("metrics.json")))
    assert f"note: {runs} finished run(s) of study tiny" in result.stderr
    assert "rule evaluate" not in result.stdout + result.stderr and "rule report" in result.stdout + result.stderr
    runs_csv = (study / "results/tables/tiny/runs.csv").read_text()
    assert runs_csv.count("no eval_") == runs  # each run's row says why it has no evaluation


# --------------------------------------------------------------------------- retrying a run by hand

def train_cli(out: Path, *args: str, tracking: Path) -> subprocess.CompletedProcess:
    return deat("train", *TRAIN, "--method", "pgd_at", "--epochs", "1", "--out", str(out), "--mlflow", str(tracking),
                *args, cwd=out.parent)


@pytest.fixture
def tracking(tmp_path) -> Path:
    from test_reliability import make_tracking_file

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "mlflow.json"
    make_tracking_file(path, uri, uri)
    return path


def runs_in(tracking: Path) -> list:
    from mlflow.tracking import MlflowClient

    data = json.loads(tracking.read_text())
    return MlflowClient(data["tracking_uri"]).search_runs([data["experiment_id"]],
                                                          f"tags.mlflow.parentRunId = '{data['parent_run_id']}'")


@pytest.mark.slow
def test_a_diverged_run_can_be_retried_with_other_settings_and_a_finished_one_cannot(tmp_path, tracking):
    out = tmp_path / "run"
    diverged = train_cli(out, "--lr", "1e6", tracking=tracking)
    assert diverged.returncode == 2 and "diverged" in diverged.stderr, diverged.stderr[-2000:]
    assert [r.info.status for r in runs_in(tracking)] == ["FAILED"]

    retried = train_cli(out, "--lr", "0.05", tracking=tracking)
    assert retried.returncode == 0, retried.stderr[-2000:]
    statuses = sorted((r.info.status, r.data.params["lr"]) for r in runs_in(tracking))
    assert statuses == [("FAILED", "1000000.0"), ("FINISHED", "0.05")]
    assert (out / "mlflow_run_id").read_text() == next(r.info.run_id for r in runs_in(tracking)
                                                       if r.info.status == "FINISHED")

    refused = train_cli(out, "--lr", "0.1", tracking=tracking)
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error:") and "lr: checkpoint 0.05 vs now 0.1" in error[0]
    assert sorted(r.info.status for r in runs_in(tracking)) == ["FAILED", "FINISHED"]  # the finished run untouched


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_the_rerun_finishes_it(tmp_path, tracking):
    """What SLURM sends on preemption or time-out: the MLflow run must not stay RUNNING forever."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "deat", "train", *TRAIN, "--method", "deat", "--lr", "0.05", "--epochs", "3",
               "--out", str(out), "--mlflow", str(tracking)]
    job = subprocess.Popen(command, cwd=tmp_path, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    wait_until(lambda: (out / "running/checkpoint.pt").is_file(), 300, "the first finished epoch")
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr[-2000:]
    [run] = runs_in(tracking)
    assert run.info.status == "KILLED" and run.info.end_time is not None

    resumed = subprocess.run(command, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [run] = runs_in(tracking)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_failed_workflow_leaves_no_study_running_in_mlflow(tmp_path):
    """A prepare step that fails (a corrupt data file here; paper_table2 offline in the issue) once left the
    study's parent run RUNNING forever."""
    (tmp_path / "broken.npz").write_bytes(b"not a numpy archive")
    config = tiny_study()
    config["studies"]["tiny"]["dataset"] = "npz:broken.npz"
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", "--keep-going")
    assert result.returncode != 0
    parents = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("deat.role") == "study"]
    assert parents and all(r.info.status == "FAILED" for r in parents)


# ------------------------------------------------------------------------------------------ resuming

def readme_commands(after: str) -> list[str]:
    """The commands of the first bash block after the line containing `after` in README.md, comments removed."""
    text = (REPO / "README.md").read_text()
    rest = text[text.index(after):]
    start = rest.index("```bash\n") + len("```bash\n")
    return [line.split("#")[0].strip() for line in rest[start:rest.index("```", start)].splitlines()
            if line.split("#")[0].strip()]


def run_as_written(command: str, cwd: Path, timeout: int = 900, background: bool = False):
    """A README command as written, run in `cwd` against this repository's Snakefile or package."""
    import shlex

    argv = shlex.split(command)
    if argv[0] == "snakemake":
        argv = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *argv[1:]]
    else:
        assert argv[:3] == ["python", "-m", "deat"], command
        argv = [sys.executable, *argv[1:]]
    if background:
        return subprocess.Popen(argv, cwd=cwd, env=job_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(argv, cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_readme_resume_commands_as_written_resume_a_custom_study_killed_with_kill_9(tmp_path):
    """Issue 12, case 5b, and issue 26: the README's resume block, run as written, on a study started with
    --config/--configfile and killed with kill -9 mid-training; the bare command names the interrupted run."""
    unlock, bare, with_flags = readme_commands("## Resuming after a crash")
    assert unlock == "snakemake --unlock" and bare == "snakemake --cores all --rerun-incomplete"
    assert with_flags == "snakemake --cores all --rerun-incomplete --config run=[res] --configfile res.yaml"
    write_config(tmp_path, tiny_study())  # the project's config.yaml: study `tiny` only
    custom = tiny_study(epochs=5)  # 1-3 s an epoch: killed after the first, 4 left (attempts == 2 checks it)
    (tmp_path / "res.yaml").write_text(yaml.safe_dump({"studies": {"res": {**custom["studies"]["tiny"],
                                                                            "methods": ["deat"]}}}))
    started = with_flags.replace(" --rerun-incomplete", "")  # what the user started with
    job = run_as_written(started, tmp_path, background=True)
    wait_until(lambda: any((tmp_path / "results/runs").rglob("running/checkpoint.pt")), 600, "a finished epoch")
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert run_as_written(unlock, tmp_path).returncode == 0

    dry = run_as_written(bare + " -n", tmp_path)
    assert dry.returncode == 0
    assert "interrupted run(s) belong to no study" in dry.stderr and "deat" in dry.stderr

    resumed = run_as_written(with_flags, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [metrics] = (tmp_path / "results/runs").rglob("metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "complete" and len(record["attempts"]) == 2
    log = next((tmp_path / "results/logs/train").rglob("*.log")).read_text()
    assert "=== resuming" in log and log.index("iterations/epoch") < log.index("=== resuming")  # history kept
    assert {r.info.status for r in mlflow_runs(tmp_path)} == {"FINISHED"}


# ------------------------------------------------------------------------- files teammates can read

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_checkpoint(tmp_path / "b.pt", {"x": 1})
    finally:
        os.umask(previous)
    for name in ("a.json", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.slow
def test_a_training_run_writes_files_a_teammate_can_read(tmp_path):
    """umask 022: metrics.json, checkpoints and the MLflow id file are 0644, not mkstemp's 0600."""
    out = tmp_path / "run"
    result = deat("train", *TRAIN, "--method", "pgd_at", "--epochs", "1", "--out", str(out), cwd=tmp_path,
                  prefix=("sh", "-c", 'umask 022 && exec "$@"', "sh"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("metrics.json", "best.pt", "last.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------------------- a fresh clone

def git_ignored(path: str) -> bool:
    return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", path]).returncode == 0


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the repository's git checkout")
def test_the_readme_commands_write_only_ignored_files_and_nothing_committed():
    """On a fresh clone `snakemake --cores all` must have work to do (no committed output of the default study)
    and leave `git status` clean; so must the README's run-by-hand example."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["run"] == ["quick"]
    committed = subprocess.run(["git", "-C", str(REPO), "ls-files", "results/runs/mnist5k", "results/tables/quick",
                                "results/figures/quick", "results/studies/quick", "results/data/mnist5k.json"],
                               capture_output=True, text=True).stdout
    assert committed == ""
    for path in ("results/runs/mnist5k/small_cnn/pgd_at/0123abcd/lr0.01_bs64_seed0/metrics.json",
                 "results/runs/mnist5k/small_cnn/deat/0123abcd/lr0.01_bs64_seed0/eval_0123abcd.json",
                 "results/studies/quick/manifest.json", "results/studies/quick/mlflow.json",
                 "results/tables/quick/runs.csv", "results/figures/quick/robust_acc_vs_lr.png",
                 "results/data/mnist5k.json", "results/mlflow/mlflow.db", "results/logs/train/x.log",
                 "results/runs/example/metrics.json", "results/runs/example/last.pt"):
        assert git_ignored(path), path
    committed_run = "results/runs/npz-cifar10_small/small_cnn/pgd_at/0123abcd/lr0.01_bs128_seed0"
    assert not git_ignored(f"{committed_run}/metrics.json")
    assert git_ignored(f"{committed_run}/train.lock") and git_ignored(f"{committed_run}/mlflow_run_id")


@pytest.mark.slow
def test_committed_studies_load_into_mlflow_once(tmp_path, finished_study):
    """`python -m deat mlflow-import`: a parent per study, a FINISHED child per run with every epoch; idempotent."""
    results = tmp_path / "results"
    shutil.copytree(finished_study / "results", results, ignore=shutil.ignore_patterns("mlflow", "*.pt",
                                                                                        "mlflow_run_id"))
    (command,) = [c for c in readme_commands("browsed the same way") if "mlflow-import" in c]
    assert command == "python -m deat mlflow-import --results-dir results"
    first = run_as_written(command, tmp_path)  # as written: the store the README's `mlflow ui` opens
    assert first.returncode == 0, first.stderr[-2000:]
    assert "1 study run(s) and 1 run(s) added" in first.stdout
    uri = f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    again = run_as_written(command, tmp_path)
    assert "0 study run(s) and 0 run(s) added" in again.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("deat").experiment_id])
    assert sorted(r.data.tags["deat.role"] for r in runs) == ["grid_point", "study"]
    child = next(r for r in runs if r.data.tags["deat.role"] == "grid_point")
    metrics = json.loads((tmp_path / child.data.tags["deat.run_dir"] / "metrics.json").read_text())
    assert child.info.status == "FINISHED" and "k1" not in child.data.params
    history = client.get_metric_history(child.info.run_id, "epoch/test_pgd_acc")
    assert sorted((m.step, m.value) for m in history) == [(r["epoch"], r["test_pgd_acc"]) for r in metrics["epochs"]]
    assert "eval/best/pgd10_acc" in child.data.metrics
