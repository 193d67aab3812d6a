#!/usr/bin/env bash
# Train the built-in models side by side on one CUDA GPU, then judge each prior with
# `apa evaluate-prior`. The recipes are the CPU ones (`apa train-prior`, `apa train-oracle`): the
# batches are drawn on the CPU with the same seeded generator, so only the speed differs.
#
# Usage: scripts/train_on_gpu.sh OUT_DIR [MINUTES]
#   OUT_DIR  gets <name>.safetensors, <name>.loss.csv and evaluate-<name>.json for every run
#   MINUTES  wall-time cap of every run (checkpointed and exported where it stopped; default 6)
# Runs: prior-mnist-9k and prior-fashion-9k (the shipped recipe, 9,000 steps), prior-mnist-30k and
# prior-fashion-30k (the same, longer), oracle-fashion-20k (the oracle recipe for 20,000 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/train_on_gpu.sh OUT_DIR [MINUTES]}
MINUTES=${2:-6}
APA=${APA:-apa}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}

train() {  # name kind dataset steps
  $APA "train-$2" --dataset "$3" --train-steps "$4" --device cuda --minutes "$MINUTES" \
    --run-dir "runs/gpu/$1" --export "$OUT/$1.safetensors" >"$OUT/$1.log" 2>&1
  cp "runs/gpu/$1/loss.csv" "$OUT/$1.loss.csv"
}

train prior-mnist-9k prior mnist 9000 &
train prior-mnist-30k prior mnist 30000 &
train prior-fashion-9k prior fashion 9000 &
train prior-fashion-30k prior fashion 30000 &
train oracle-fashion-20k oracle fashion 20000 &
wait

for run in prior-mnist-9k prior-mnist-30k; do
  $APA evaluate-prior --dataset mnist -n 1024 --device cuda --prior-weights "$OUT/$run.safetensors" \
    >"$OUT/evaluate-$run.json"
done
for run in prior-fashion-9k prior-fashion-30k; do
  $APA evaluate-prior --dataset fashion -n 1024 --device cuda --prior-weights "$OUT/$run.safetensors" \
    --oracle-weights "$OUT/oracle-fashion-20k.safetensors" >"$OUT/evaluate-$run.json"
  $APA evaluate-prior --dataset fashion -n 1024 --device cuda --prior-weights "$OUT/$run.safetensors" \
    >"$OUT/evaluate-$run-shipped-oracle.json"
done
