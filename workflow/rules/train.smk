# One training job per grid point: python -m deat train, resumable after a crash (rerun the same command).


rule train:
    input:
        data=lambda w: f"results/data/{dataset_tag(run_entry(w)['train']['dataset'])}.json",
        tracking=tracking_file,
    output:
        metrics="results/runs/{run}/metrics.json",
        best="results/runs/{run}/best.pt",
        last="results/runs/{run}/last.pt",
    log:
        "results/logs/train/{run}.log",
    params:
        flags=lambda w: cli_flags(run_entry(w)["train"]),
        gpu_flags=f"--gpu-lock-dir results/locks --runs-per-gpu {config['runs_per_gpu']}",
    threads: 1  # small models run best as parallel single-thread jobs on a CPU; GPU jobs need one
    resources:
        gpu=1 if uses_gpu() else 0,
    shell:
        "OMP_NUM_THREADS={threads} python -m deat train {params.flags} --out results/runs/{wildcards.run} --mlflow {input.tracking}"
        " {params.gpu_flags} > {log} 2>&1"
