# Dataset preparation (and, for torchvision sets, the one download) before the training fan-out.


rule prepare_dataset:
    output:
        "results/data/{dataset}.json",
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    params:
        dataset=lambda w: next(
            s["dataset"] for s in config["studies"].values() if dataset_tag(s["dataset"]) == w.dataset
        ),
        data_root=config["data_root"],
    shell:
        "python -m deat prepare --dataset '{params.dataset}' --data-root '{params.data_root}'"
        " --out {output} > {log} 2>&1"


rule mlflow_store:
    output:
        "results/mlflow/experiment.json",
    log:
        "results/logs/mlflow/store.log",
    params:
        uri=config["mlflow"]["tracking_uri"],
        experiment=config["mlflow"]["experiment"],

    shell:
        "python -m deat mlflow-init --tracking-uri '{params.uri}' --experiment '{params.experiment}'"
        " --out {output} > {log} 2>&1"


rule study_manifest:
    output:
        "results/studies/{study}/manifest.json",
    params:
        manifest=lambda w: study_manifest(w.study),
    log:
        "results/logs/study_manifest/{study}.log",
    run:
        from deat.checkpoint import write_json

        write_json(output[0], params.manifest)


rule mlflow_study:
    input:
        store=rules.mlflow_store.output[0],
        manifest="results/studies/{study}/manifest.json",
    output:
        "results/studies/{study}/mlflow.json",
    log:
        "results/logs/mlflow/{study}.log",
    shell:
        "python -m deat mlflow-study --store {input.store} --study {wildcards.study}"
        " --manifest {input.manifest} --out {output} > {log} 2>&1"

