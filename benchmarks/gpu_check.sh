#!/usr/bin/env bash
# The GPU check of every method in one device call: correctness first, then bf16 fidelity, throughput, AutoAttack.
#
#   bash benchmarks/gpu_check.sh prepare  # here, once: .bench_data/ gets cifar10_small.npz and pyautoattack's sources
#   bash benchmarks/gpu_check.sh          # there, from the repository root (device tool: carry [".bench_data"])
#   PARTS="env bf16 summary" bash benchmarks/gpu_check.sh   # only these parts (default: every part but the optional)
#
# Default parts and their limits (s): env 20, tests 60, numerics 90, bf16 45, throughput 120, autoattack 180,
# summary 15: 530 s in all, so a hang costs at most its own part and one call stays within 10 minutes. Optional
# parts (PARTS=...): compile 70, accuracy 105, large 260. Each part writes its log and JSON lines under $OUT (the
# device tool's returned folder, or results/gpu_check when run by hand); the last lines printed are the summary of
# every part, with the targets of issues 6 and 25.
set -uo pipefail
DATA=${DATA:-.bench_data/cifar10_small.npz}
SITE=.bench_data/site  # pyautoattack's sources: the GPU machine's image lacks the package

if [ "${1:-}" = prepare ]; then  # here, where the repository's environment has the data and pyautoattack
    mkdir -p .bench_data "$SITE/pyautoattack"
    cp -f data/cifar10_small.npz "$DATA" || { echo "prepare: data/cifar10_small.npz missing (see deat/data.py)" >&2; exit 2; }
    autoattack=$(python3 -c "import os, pyautoattack; print(os.path.dirname(pyautoattack.__file__))") || exit 2
    cp "$autoattack"/*.py "$SITE/pyautoattack/"
    echo "prepared $DATA and $SITE/pyautoattack; now run this script on the GPU machine, carrying .bench_data"
    exit 0
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [prepare]" >&2
    exit 2
fi

export PYTHONUNBUFFERED=1 PYTHONPATH=.:$SITE PYTHONDONTWRITEBYTECODE=1
# The device tool returns at most 8 files from $OUT: parts write to a work folder, archived after each part.
RETURNED=${OUT:-results/gpu_check}
OUT=$(mktemp -d)
mkdir -p "$RETURNED"
: > "$OUT/parts.txt"

PARTS=${PARTS:-env tests numerics bf16 throughput autoattack summary}

part() {  # part NAME LIMIT_S COMMAND...: run under a time limit into $OUT/NAME.log; record exit code and seconds
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    local started=$SECONDS
    echo "=== $name (limit ${limit} s)"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" TIMED OUT (what finished is in $name.log)"
    echo "$name: exit $rc after $((SECONDS - started)) s$note" | tee -a "$OUT/parts.txt"
    tail -n 2 "$OUT/$name.log"
    tar czf "$RETURNED/gpu_check.tgz" -C "$OUT" .
}

if [ ! -f "$DATA" ]; then
    echo "missing $DATA: run \`bash benchmarks/gpu_check.sh prepare\` here and carry .bench_data" >&2
    exit 2
fi

# The machine, and that deat imports there without snakemake/mlflow/mlxtend; the graph RNG API is present.
part env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv &&
    python3 -c "import sys, torch, deat.train, deat.fast; print(\"python\", sys.version.split()[0], \"torch\",
torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0),
\"register_generator_state:\", hasattr(torch.cuda.CUDAGraph, \"register_generator_state\"))"'

# (a) Correctness: captured vs eager steps and bf16 attacks (small CNN, pytest), then PreAct-ResNet-18 step by step
# for every objective (JSON).
part tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_fast.py tests/test_gpu.py -k cuda
part numerics 90 python3 benchmarks/fast_check.py numerics --npz "$DATA" --methods pgd_at deat trades mart fast_at \
    --out "$OUT/numerics.jsonl"

# (b) bf16 against IEEE fp32 for every objective's training attack: first-step sign agreement, final attack loss,
# attack time (the training step's speed under each precision is in (c)).
part bf16 45 python3 benchmarks/bf16_check.py --npz "$DATA" --out "$OUT/bf16.jsonl"

# (c) Throughput, PGD-10, batch 128 (issue 25: PGD-AT >= 6,000 images/s): every objective with each outer step
# timed in alternation, fp32 vs bf16 and eager vs CUDA graph.
part throughput 120 python3 benchmarks/throughput.py --npz "$DATA" --archs preact_resnet18 --batch-sizes 128 \
    --methods pgd_at deat trades mart fast_at --variants fp32:eager bf16-cl:eager bf16-cl:cuda_graph \
    --out "$OUT/throughput.jsonl"

# (d) Standard AutoAttack on 10,000 images (cifar10_small's 1,000 test images 10x) of a PreAct-ResNet-18 trained
# here for 5 epochs; one line per 2,000-image chunk, so a timeout still leaves a rate (issue 25: <= 120 s).
part autoattack 180 python3 benchmarks/autoattack_check.py --npz "$DATA" --out "$OUT/autoattack.jsonl"

# Optional parts (name them in PARTS). torch.compile, one mode, capped: compilation alone may take most of the slot
# (setup_s reports it).
part compile 70 python3 benchmarks/throughput.py --npz "$DATA" --archs preact_resnet18 --batch-sizes 128 \
    --methods pgd_at --variants bf16-cl:compile --compile-mode reduce-overhead --warmup 6 --repeats 3 \
    --out "$OUT/throughput_compile.jsonl"

# Batch >= 512, where the step is compute-bound: eager and graph, then cuDNN's own algorithm search
# (cudnn_benchmark) with the graph, and torch.compile's fusion (default mode, no graph needed at this size).
part large 260 bash -c '
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 512 \
    --variants fp32:eager bf16-cl:eager --warmup 4 --repeats 3 --steps 4 --out "$1/throughput_large.jsonl" &&
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 512 1024 2048 \
    --variants bf16-cl:cuda_graph --warmup 4 --repeats 3 --steps 4 --out "$1/throughput_large.jsonl" &&
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 512 1024 2048 \
    --variants bf16-cl:cuda_graph --cudnn-benchmark --warmup 4 --repeats 3 --steps 4 \
    --out "$1/throughput_large.jsonl" &&
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 1024 --methods pgd_at \
    --variants bf16-cl:compile --compile-mode default --cudnn-benchmark --warmup 4 --repeats 3 --steps 4 \
    --out "$1/throughput_large.jsonl"' "$DATA" "$OUT"

# A few epochs on cifar10_small, fp32 eager vs bf16 + channels_last + CUDA graph, 2 seeds per method.
part accuracy 105 python3 benchmarks/fast_check.py accuracy --npz "$DATA" --epochs 4 --seeds 0 1 \
    --out "$OUT/accuracy.jsonl"

part summary 15 python3 benchmarks/fast_check.py summary "$OUT"
echo "=== summary"
cat "$OUT/summary.log"
echo "=== parts"
cat "$OUT/parts.txt"
