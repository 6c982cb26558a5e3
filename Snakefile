# deat: PGD-AT vs DEAT studies, from config.yaml to tables.
#   snakemake --cores all                                  # the default `quick` study, offline, CPU
#   snakemake --cores all --resources gpu=4 --config run=[paper_table2]
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# Snakemake runs these hooks in real runs only: not for -n, nor inside cluster jobs, nor when there is nothing to do.
# mlflow.tracking_uri: server -> an MLflow server on 127.0.0.1 for this run only (deat/server.py).
# At the start, a run that MLflow shows RUNNING but whose process is gone (kill -9, the OOM killer) becomes KILLED.
# On failure, a study whose report did not run shows FAILED in MLflow, not RUNNING forever.
SERVER = config["mlflow"]["tracking_uri"] == "server"
if SERVER:
    from deat.server import start_server, stop_server


onstart:
    if SERVER:
        start_server()
    from deat.tracking import reconcile_at_start

    reconcile_at_start(config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"])


if SERVER:

    onsuccess:
        stop_server()


onerror:
    from deat.tracking import fail_study_runs

    try:
        fail_study_runs([f"results/studies/{study}/mlflow.json" for study in config["run"]],
                        setup=(config["mlflow"]["tracking_uri"], config["mlflow"]["experiment"], config["run"]))
    except Exception as err:  # the store itself may be what failed: say so, and still stop the server
        print(f"warning: could not mark the studies' MLflow runs FAILED: {err}", file=sys.stderr)
    finally:
        if SERVER:
            stop_server()


rule all:
    input:
        lambda w: print_notes()
        + expand("results/tables/{study}", study=config["run"])
        + expand("results/figures/{study}", study=config["run"]),
