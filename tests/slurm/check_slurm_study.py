"""Checks for run_slurm_test.sh: the study's outputs, its MLflow runs, and SLURM's record of every job.

    python check_slurm_study.py STUDY_DIR SNAKEMAKE_LOG SACCT_FILE ACCOUNT
"""

import json
import re
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

GPU_RULES = ("train", "evaluate")


def main(study: Path, snakemake_log: Path, sacct_file: Path, account: str) -> None:
    manifest = json.loads((study / "results/studies/tiny/manifest.json").read_text())
    epochs = manifest["protocol"]["epochs"]
    for run in manifest["runs"]:
        metrics = json.loads((study / run["dir"] / "metrics.json").read_text())
        assert metrics["status"] == "complete" and len(metrics["epochs"]) == epochs, run["dir"]
        evaluation = json.loads((study / run["eval"]).read_text())
        assert all(0 <= evaluation["checkpoints"]["last"][k] <= 1 for k in ("clean_acc", "pgd_acc", "aa_acc"))
    assert list((study / "results/tables/tiny").glob("*.md")), "no tables"
    assert list((study / "results/figures/tiny").glob("*.png")), "no figures"
    assert not (study / "results/mlflow/server.json").exists(), "the MLflow server was not stopped"

    client = MlflowClient(f"sqlite:///{study}/results/mlflow/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("deat").experiment_id])
    children = [r for r in runs if r.data.tags.get("deat.role") == "grid_point"]
    assert len(runs) == 1 + len(manifest["runs"]) and len(children) == len(manifest["runs"]), len(runs)
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "test_pgd_acc"))
        assert steps == list(range(1, epochs + 1)), steps

    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", snakemake_log.read_text()))
    accounted = {}
    for line in sacct_file.read_text().splitlines():
        job_id, partition, job_account, state, exit_code, tres, comment = line.split("|")
        accounted[job_id] = (partition, job_account, state, exit_code, tres, comment)
    assert submitted, "snakemake submitted no SLURM job"
    missing = submitted - set(accounted)
    assert not missing, f"submitted but not in sacct: {sorted(missing)}"
    rules = {}
    for job_id in submitted:
        partition, job_account, state, exit_code, tres, comment = accounted[job_id]
        assert (partition, job_account, state, exit_code) == ("debug", account, "COMPLETED", "0:0"), accounted[job_id]
        rule = re.match(r"rule_([a-z_]+?)(_wildcards_|$)", comment).group(1)
        rules[rule] = rules.get(rule, 0) + 1
        assert ("gres/gpu=1" in tres) == (rule in GPU_RULES), (rule, tres)
    expected = {"prepare_dataset": 1, "mlflow_store": 1, "study_manifest": 1, "mlflow_study": 1,
                "train": len(manifest["runs"]), "evaluate": len(manifest["runs"]), "report": 1}
    assert rules == expected, rules
    print(f"OK: {len(submitted)} SLURM jobs, all COMPLETED in sacct ({rules}); "
          f"{len(children)} MLflow child runs with {epochs} epochs each; tables and figures written")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
