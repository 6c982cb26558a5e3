# One training job per grid point: python -m deat train, resumable after a crash (rerun the same command).


rule train:
    input:
        data=lambda w: ancient(f"results/data/{dataset_tag(run_entry(w)['train']['dataset'])}.json"),
    # metrics.json alone: Snakemake deletes a job's outputs before it reruns the job, and best.pt / last.pt must
    # never be deleted. A rerun whose metrics.json was deleted is published again from last.pt in a second.
    output:
        metrics="results/runs/{run}/metrics.json",
    log:
        "results/logs/train/{run}.log",
    params:
        tracking=tracking_file,
        # mlflow.log_model rides on the untracked flags: the shell command's text (Snakemake's code trigger) and
        # the run's identity stay as they were, so switching it on retrains nothing.
        flags=lambda w: Untracked(
            f"{cli_flags(run_entry(w)['train'])}{' --mlflow-log-model' if config['mlflow'].get('log_model') else ''}"
        ),
        gpu=gpu_options(),
    threads: 1  # small models run best as parallel single-thread jobs on a CPU; GPU jobs need one
    resources:
        gpu=1 if uses_gpu() else 0,
    shell:
        "OMP_NUM_THREADS={threads} python -m deat train {params.flags} --out results/runs/{wildcards.run} --mlflow {params.tracking}"
        " {params.gpu} > {log} 2>&1"
