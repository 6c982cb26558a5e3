#!/usr/bin/env bash
# Run one study's training and evaluation jobs on a GPU machine that has torch but not Snakemake or MLflow (the
# device tool's machine), with the very commands the workflow would run, and bring back their JSON files.
#
#   bash benchmarks/gpu_study.sh plan STUDY [PARALLEL]  # here, with Snakemake: writes .bench_data/gpu_study/
#   bash benchmarks/gpu_study.sh run                    # there (carry .bench_data, data): trains, evaluates, archives
#   TRAIN_LIMIT_S=240 EVAL_LIMIT_S=80 bash benchmarks/gpu_study.sh run   # the same, each phase capped
#   bash benchmarks/gpu_study.sh run evaluate           # only evaluate (checkpoints already on that machine)
#   tar xzf OUT/gpu_study.tgz                           # here again: results/runs/... JSON files and logs
#   python -m deat report --manifest results/studies/STUDY/manifest.json
#
# `plan` asks Snakemake for the study's train and evaluate commands (a dry run with device=cuda, or $DEVICE, and
# runs_per_gpu=PARALLEL, default 4) and writes the manifest; MLflow logging is left out of the commands, since
# the GPU machine has no MLflow. `run` runs PARALLEL jobs at a time, which share the card through the workflow's
# own GPU leases (--gpu-lock-dir), and archives every run's metrics.json, eval_*.json and log to
# $OUT/gpu_study.tgz (results/gpu_study when run by hand). Checkpoints stay behind. The device tool copies the
# working tree afresh for each call and keeps only ignored files: on a second call to the same machine the
# checkpoints (*.pt) are still there but metrics.json is not, so rerun only `evaluate` there. `plan` also copies
# pyautoattack's sources into the plan (the GPU image lacks it; its wheel's 44 MB of examples are left out).
set -euo pipefail
PLAN=.bench_data/gpu_study

plan() {
    local study=$1 parallel=${2:-4}
    mkdir -p "$PLAN"
    local args=(--config "run=[$study]" "device=${DEVICE:-cuda}" "runs_per_gpu=$parallel")
    # --config takes every value after it, so targets come first.
    snakemake --cores 1 --nolock "results/studies/$study/manifest.json" "${args[@]}" > "$PLAN/snakemake.log" 2>&1 ||
        { tail -n 20 "$PLAN/snakemake.log" >&2; return 1; }
    snakemake -n -p --forceall "${args[@]}" 2>&1 | sed -n 's/^Shell command: //p' > "$PLAN/dry_run.txt"
    # The GPU image has no MLflow: every MLflow flag goes, a study's `mlflow: {log_model: true}` included.
    for rule in train evaluate; do
        grep "python -m deat $rule " "$PLAN/dry_run.txt" | sed -e 's/ --mlflow-log-model//' -e 's/ --mlflow-setup [^ ]* [^ ]* [^ ]*//' -e 's/ --mlflow [^ ]*//' > "$PLAN/$rule.txt" || true
    done
    local autoattack
    autoattack=$(python3 -c "import os, pyautoattack; print(os.path.dirname(pyautoattack.__file__))")
    rm -rf "$PLAN/site" && mkdir -p "$PLAN/site/pyautoattack" && cp "$autoattack"/*.py "$PLAN/site/pyautoattack/"
    echo "$parallel" > "$PLAN/parallel"
    echo "$study" > "$PLAN/study"
    echo "planned $(wc -l < "$PLAN/train.txt") training and $(wc -l < "$PLAN/evaluate.txt") evaluation jobs" \
         "of study $study, $parallel at a time"
}

run_all() {  # run_all FILE PARALLEL LIMIT_S: every command line of FILE, PARALLEL at a time, all within LIMIT_S
    local file=$1 parallel=$2 limit=$3
    grep -o '> [^ ]*\.log' "$file" | cut -c3- | xargs -r -n1 dirname | sort -u | xargs -r mkdir -p
    # timeout signals its whole process group, so the jobs go too; what finished is kept and archived.
    tr '\n' '\0' < "$file" | timeout --kill-after=10 "$limit" xargs -0 -r -P "$parallel" -I{} bash -c '{}'
}

run() {  # run [all|train|evaluate]
    local phase=${1:-all} returned=${OUT:-results/gpu_study} parallel study started=$SECONDS status=0
    parallel=$(cat "$PLAN/parallel")
    study=$(cat "$PLAN/study")
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=.:$PLAN/site${PYTHONPATH:+:$PYTHONPATH}
    mkdir -p "$returned"
    if ! command -v python > /dev/null; then  # the workflow's commands say python; some images have only python3
        mkdir -p "$PLAN/bin" && ln -sf "$(command -v python3)" "$PLAN/bin/python" && export PATH=$PWD/$PLAN/bin:$PATH
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    if [[ $phase != evaluate ]]; then
        run_all "$PLAN/train.txt" "$parallel" "${TRAIN_LIMIT_S:-86400}" || status=$?
        echo "training: exit $status after $((SECONDS - started)) s"
    fi
    if [[ $phase != train ]]; then
        run_all "$PLAN/evaluate.txt" "$parallel" "${EVAL_LIMIT_S:-86400}" || status=$?
        echo "evaluation: exit $status after $((SECONDS - started)) s"
    fi
    # Every run directory the plan names, with what it has: failed runs bring back their logs too.
    sed -n 's/.*--out \([^ ]*\).*/\1/p' "$PLAN/train.txt" | sort -u > "$PLAN/run_dirs.txt"
    xargs -a "$PLAN/run_dirs.txt" -I{} find {} -maxdepth 1 \( -name metrics.json -o -name 'eval_*.json' \) \
        ! -name '*.partial.json' \
        2>/dev/null > "$PLAN/returned.txt" || true
    find results/logs -name '*.log' >> "$PLAN/returned.txt"
    tar czf "$returned/gpu_study.tgz" -T "$PLAN/returned.txt"
    echo "study $study: $(grep -c metrics.json "$PLAN/returned.txt") metrics.json," \
         "$(grep -c 'eval_' "$PLAN/returned.txt") eval files archived in $((SECONDS - started)) s"
    return "$status"
}

case ${1:-} in
    plan) shift; plan "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 plan STUDY [PARALLEL] | run [all|train|evaluate]" >&2; exit 2 ;;
esac
