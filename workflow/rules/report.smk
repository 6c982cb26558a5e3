# Paper tables, statistics and figures per study, from the runs' JSON files only.


rule report:
    input:
        manifest="results/studies/{study}/manifest.json",
        tracking="results/studies/{study}/mlflow.json",
        runs=lambda w: study_outputs(w.study),
    output:
        tables=directory("results/tables/{study}"),
        figures=directory("results/figures/{study}"),
    log:
        "results/logs/report/{study}.log",
    shell:
        "python -m deat report --manifest {input.manifest} --tables-dir {output.tables}"
        " --figures-dir {output.figures} --mlflow {input.tracking} > {log} 2>&1"
