#!/usr/bin/env bash
# The GPU training measurement (scripts/bench_train_gpu.py, profiled) on a lent device machine, in two calls to
# the same warm machine, since the wheels of both parts do not fit one call (scripts/gpu_wheels.sh makes them):
#   a  carry .whl/train:   ours, ours-ckpt, ours-packed, the TRL    -> $OUT/train-a.json, train-a.log, gpu-a.txt
#      variants, ours-kd and trl-kd
#   b  carry .whl/unsloth: ours and trl-bf16w again (the baseline   -> $OUT/train-b.json, train-b.log, gpu-b.txt
#      in the same run, under Unsloth's TRL), ours-unsloth, trl-unsloth, ours-packed-sdpa; needs part a's
#      packages still on the machine
# STEPS (default 10) timed optimizer steps per variant after 3 warm-up ones, then 2 profiled; the JSON is
# rewritten after every variant, so a call cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: scripts/gpu_train_bench.sh a|b}
out=${OUT:-/tmp/gpu-train-bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl; }
case $part in
a)
    install .whl/train /tmp/site
    export PYTHONPATH=/tmp/site:src
    variants="ours ours-ckpt ours-packed trl trl-bf16w trl-liger trl-padfree ours-kd trl-kd"
    ;;
b)
    if [ ! -d /tmp/site/bitsandbytes ]; then
        echo "part b needs part a's packages on this machine: run part a first, then b while the machine is warm" >&2
        exit 1
    fi
    install .whl/unsloth /tmp/site-unsloth
    export PYTHONPATH=/tmp/site-unsloth:/tmp/site:src
    variants="ours trl-bf16w ours-unsloth trl-unsloth ours-packed-sdpa"
    ;;
*)
    echo "usage: scripts/gpu_train_bench.sh a|b" >&2
    exit 2
    ;;
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-$part.txt"
# shellcheck disable=SC2086  # one word per variant
python3 scripts/bench_train_gpu.py --steps "${STEPS:-10}" --warmup-steps 3 --profile --variants $variants \
    --json "$out/train-$part.json" > "$out/train-$part.log" 2>&1 || status=$?
grep -v "it/s\]" "$out/train-$part.log" | tail -80
exit "${status:-0}"
