# Paper tables, statistics and figures per study, from the runs' JSON files only.
# `snakemake --report report.html` (or .zip) after a study: its figures, its tables (each shown with its caption),
# its protocol, and its training and evaluation logs, each with a caption from workflow/report/*.rst.


report: "../report/workflow.rst"


def study_logs(study):
    """The train and evaluate logs of a study's runs (those that exist when the report job runs are copied)."""
    logs = []
    for run in STUDY_RUNS[study]:
        name = run["dir"].removeprefix("results/runs/")
        logs.append(f"results/logs/train/{name}.log")
        logs.append(f"results/logs/evaluate/{name}_{Path(run['eval']).stem.removeprefix('eval_')}.log")
    return Untracked(" ".join(dict.fromkeys(logs)))  # a run two grid points share appears once


rule report:
    input:
        manifest="results/studies/{study}/manifest.json",
        tracking="results/studies/{study}/mlflow.json",
        runs=lambda w: study_outputs(w.study),
    output:
        tables=report(directory("results/tables/{study}"), patterns=["{name}.csv", "{name,protocol}.md"],
                      caption="../report/table.rst", category="Tables", subcategory="{study}"),
        figures=report(directory("results/figures/{study}"), patterns=["{name}.png"],
                       caption="../report/figure.rst", category="Figures", subcategory="{study}"),
        # Copies for Snakemake's report, which shows only files a rule outputs (logs are not outputs).
        logs=report(directory("results/logs/studies/{study}"), patterns=["{kind,train|evaluate}/{name}.log"],
                    caption="../report/log.rst", category="Logs", subcategory="{study}: {kind}",
                    labels={"run": "{name}"}),
    log:
        "results/logs/report/{study}.log",
    params:
        logs=lambda w: study_logs(w.study),
    shell:
        "python -m deat report --manifest {input.manifest} --tables-dir {output.tables}"
        " --figures-dir {output.figures} --mlflow {input.tracking} > {log} 2>&1"
        " && mkdir -p {output.logs} && for f in {params.logs}; do if [ -f $f ]; then"
        " d={output.logs}/$(dirname ${{f#results/logs/}}); mkdir -p $d && cp $f $d/; fi; done"
