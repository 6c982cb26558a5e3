# Clean, PGD-10, PGD-k x restarts and AutoAttack on best.pt and last.pt of every run; resumable.
#
# With `eval: {shards: N}` a run's evaluation is N evaluate_shard jobs (one GPU each, each on whole blocks of
# batch_size examples, resumable on its own) and one evaluate job that merges their files (on the CPU, attacking
# nothing) into the same eval_<hash>.json an unsharded evaluate job writes (deat/shards.py). The merge is the
# evaluate rule itself, with the same command text and output, so that sharding never changes what Snakemake
# recorded for a finished evaluation (its code and input-file triggers): see eval_shards in common.smk.


rule evaluate_shard:
    input:
        metrics=lambda w: ancient(f"results/runs/{w.run}/metrics.json"),
    output:
        # temp: the merged file holds the result; a shard file is deleted once merged (and git-ignored meanwhile).
        temp("results/runs/{run}/eval_{evalhash}.shard_{start}-{stop}.json"),
    log:
        "results/logs/evaluate/{run}_{evalhash}.shard_{start}-{stop}.log",
    params:
        flags=evaluate_flags,
        shard=shard_flag,
        device=Untracked(config["device"]),
        gpu=gpu_options(),
    threads: 1
    resources:
        gpu=1 if uses_gpu() else 0,
    shell:
        "OMP_NUM_THREADS={threads} python -m deat evaluate --run-dir results/runs/{wildcards.run} --out {output} {params.flags}"
        " --shard {params.shard} --device {params.device} {params.gpu} > {log} 2>&1"


rule evaluate:
    input:
        # Published with best.pt and last.pt, never before them. Ancient: in a fresh clone, file times are checkout
        # times, and a committed metrics.json newer than its committed evaluation must not send a checkpoint-less
        # run back to evaluation. A retrained run is a new directory (its identity changed), so it is evaluated.
        metrics=lambda w: ancient(f"results/runs/{w.run}/metrics.json"),
        shards=eval_shards,  # none unless the study shards its evaluation; then this job merges them
    output:
        "results/runs/{run}/eval_{evalhash}.json",
    log:
        "results/logs/evaluate/{run}_{evalhash}.log",
    params:
        tracking=tracking_file,
        flags=lambda w, input: evaluate_flags(w, input.shards),
        device=lambda w, input: Untracked("cpu" if input.shards else config["device"]),
        gpu=lambda w, input: Untracked("") if input.shards else gpu_options(),
    threads: 1  # small models run best as parallel single-thread jobs on a CPU; GPU jobs need one
    resources:
        gpu=lambda w, input: 0 if input.shards or not uses_gpu() else 1,
    shell:
        "OMP_NUM_THREADS={threads} python -m deat evaluate --run-dir results/runs/{wildcards.run} --out {output} {params.flags}"
        " --device {params.device} --mlflow {params.tracking} {params.gpu} > {log} 2>&1"
