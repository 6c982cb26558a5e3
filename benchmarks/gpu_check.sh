#!/usr/bin/env bash
# The fast path's GPU check in one device call: correctness first, then throughput, then fast-vs-slow accuracy.
#
#   bash benchmarks/gpu_check.sh      # from the repository root, with .bench_data/cifar10_small.npz present
#   PARTS="env numerics large summary" bash benchmarks/gpu_check.sh   # only these parts (default: all but large)
#
# About 5-6 minutes on one H100/H200; the default parts' limits add up to 465 s (large: 200 s more), so a hang
# costs at most its own part. Each part writes its log (and JSON lines) under $OUT: the device tool's returned folder, or
# results/gpu_check when run by hand. The last lines printed are the summary of every part.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1
# The device tool returns at most 8 files from $OUT: parts write to a work folder, archived after each part.
RETURNED=${OUT:-results/gpu_check}
OUT=$(mktemp -d)
DATA=${DATA:-.bench_data/cifar10_small.npz}
mkdir -p "$RETURNED"
: > "$OUT/parts.txt"

PARTS=${PARTS:-env tests numerics throughput compile accuracy summary}

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
    echo "missing $DATA: copy the prepared data/cifar10_small.npz there and carry .bench_data" >&2
    exit 2
fi

# The machine, and that deat imports there without snakemake/mlflow/mlxtend; the graph RNG API is present.
part env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv &&
    python3 -c "import sys, torch, deat.train, deat.fast; print(\"python\", sys.version.split()[0], \"torch\",
torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0),
\"register_generator_state:\", hasattr(torch.cuda.CUDAGraph, \"register_generator_state\"))"'

# (a) Correctness: captured vs eager steps (small CNN, pytest), then PreAct-ResNet-18 step by step (JSON).
part tests 45 python3 -m pytest -q -p no:cacheprovider tests/test_fast.py -k cuda
part numerics 60 python3 benchmarks/fast_check.py numerics --npz "$DATA" --out "$OUT/numerics.jsonl"

# (b) Throughput, PGD-10, both methods timed in alternation; batch 1024 last, so a timeout loses it first.
part throughput 150 python3 benchmarks/throughput.py --npz "$DATA" --archs preact_resnet18 \
    --batch-sizes 128 512 1024 --variants fp32:eager bf16-cl:eager bf16-cl:cuda_graph \
    --out "$OUT/throughput.jsonl"
# torch.compile, one mode, capped: compilation alone may take most of the slot (setup_s reports it).
part compile 70 python3 benchmarks/throughput.py --npz "$DATA" --archs preact_resnet18 --batch-sizes 128 \
    --methods pgd_at --variants bf16-cl:compile --compile-mode reduce-overhead --warmup 6 --repeats 3 \
    --out "$OUT/throughput_compile.jsonl"

# Batch >= 512, where the step is compute-bound: cuDNN's own algorithm search (cudnn_benchmark) with the graph,
# and torch.compile's fusion (default mode, no graph needed at this size), at 512, 1024 and 2048.
part large 200 bash -c '
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 512 1024 2048 \
    --variants bf16-cl:cuda_graph --warmup 4 --repeats 3 --steps 4 --out "$1/throughput_large.jsonl" &&
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 512 1024 2048 \
    --variants bf16-cl:cuda_graph --cudnn-benchmark --warmup 4 --repeats 3 --steps 4 \
    --out "$1/throughput_large.jsonl" &&
python3 benchmarks/throughput.py --npz "$0" --archs preact_resnet18 --batch-sizes 1024 --methods pgd_at \
    --variants bf16-cl:compile --compile-mode default --cudnn-benchmark --warmup 4 --repeats 3 --steps 4 \
    --out "$1/throughput_large.jsonl"' "$DATA" "$OUT"

# (c) A few epochs on cifar10_small, fp32 eager vs bf16 + channels_last + CUDA graph, 2 seeds per method.
part accuracy 105 python3 benchmarks/fast_check.py accuracy --npz "$DATA" --epochs 4 --seeds 0 1 \
    --out "$OUT/accuracy.jsonl"

part summary 15 python3 benchmarks/fast_check.py summary "$OUT"
echo "=== summary"
cat "$OUT/summary.log"
echo "=== parts"
cat "$OUT/parts.txt"
