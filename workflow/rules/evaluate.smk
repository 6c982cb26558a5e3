# Clean, PGD-10, PGD-k x restarts and AutoAttack on best.pt and last.pt of every run; resumable.


rule evaluate:
    input:
        # Published with best.pt and last.pt, never before them. Ancient: in a fresh clone, file times are checkout
        # times, and a committed metrics.json newer than its committed evaluation must not send a checkpoint-less
        # run back to evaluation. A retrained run is a new directory (its identity changed), so it is evaluated.
        metrics=lambda w: ancient(f"results/runs/{w.run}/metrics.json"),
    output:
        "results/runs/{run}/eval_{evalhash}.json",
    log:
        "results/logs/evaluate/{run}_{evalhash}.log",
    params:
        tracking=tracking_file,
        flags=lambda w: cli_flags(run_entry(w)["evals"][w.evalhash]),
        device=Untracked(config["device"]),
        gpu=gpu_options(),
    threads: 1  # small models run best as parallel single-thread jobs on a CPU; GPU jobs need one
    resources:
        gpu=1 if uses_gpu() else 0,
    shell:
        "OMP_NUM_THREADS={threads} python -m deat evaluate --run-dir results/runs/{wildcards.run} --out {output} {params.flags}"
        " --device {params.device} --mlflow {params.tracking} {params.gpu} > {log} 2>&1"
