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


# mlflow.tracking_uri: server -> an MLflow server on 127.0.0.1 for this run only (deat/server.py). Snakemake runs
# these hooks in real runs only: not for -n, nor inside cluster jobs, nor when there is nothing to do.
if config["mlflow"]["tracking_uri"] == "server":
    from deat.server import start_server, stop_server

    onstart:
        start_server()

    onsuccess:
        stop_server()

    onerror:
        stop_server()


rule all:
    input:
        expand("results/tables/{study}", study=config["run"]),
        expand("results/figures/{study}", study=config["run"]),
