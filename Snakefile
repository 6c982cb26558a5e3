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


rule all:
    input:
        expand("results/tables/{study}", study=config["run"]),
        expand("results/figures/{study}", study=config["run"]),
