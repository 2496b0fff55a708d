#!/usr/bin/env bash
# Every GPU-only check in ONE device call (~8 minutes on one H100), each under its own
# budget so one slow part cannot starve the others:
#   1. trainer strategies on the paper setting (benchmarks/device_strategies.sh; issue 9),
#   2. the side-by-side benchmark with TRL on the Gemma-2-2B shape (benchmarks/device.sh;
#      issue 11),
#   3. FPO's D at step 0 under bf16 autocast with TopK and JumpReLU SAEs
#      (benchmarks/device_bf16.sh; issue 10).
# Prepare here: bash benchmarks/device_wheels.sh && bash benchmarks/device_strategies_wheels.sh
# (both fill .whl/, ~23 MB together). On the device (carry .whl): bash benchmarks/device_checks.sh
# $OUT gets at most 8 files: the three result JSONs/markdown and one archive of everything.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_checks}
WORK=/tmp/device_checks_work
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
stamp() { echo "=== $1 at $(($(date +%s) - start)) s"; }

# sae-lens imports wandb at import time only (training code uses it); wandb is ~20 MB, so
# an empty module stands in for it on the device.
mkdir -p "$WORK/stub/wandb" && : >"$WORK/stub/wandb/__init__.py"
python3 -c "import wandb" 2>/dev/null || export PYTHONPATH="$WORK/stub${PYTHONPATH:+:$PYTHONPATH}"
stamp strategies
# FSDP needs the reference in the policy's dtype (a bf16 one is refused: fpo.experiment).
STRATEGIES=${STRATEGIES:-"single fsdp_fp32_reference deepspeed_zero2 deepspeed_zero3"}
OUT="$WORK/strategies" STRATEGIES="$STRATEGIES" OBJECTIVES=${OBJECTIVES:-fpo} \
  BUDGET_S=${STRATEGIES_BUDGET_S:-200} RUN_TIMEOUT_S=80 bash benchmarks/device_strategies.sh
stamp benchmark
OUT="$WORK/bench" BENCH_TIMEOUT=${BENCH_TIMEOUT:-180} bash benchmarks/device.sh
stamp bf16
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
OUT="$WORK/bf16" BF16_TIMEOUT=${BF16_TIMEOUT:-80} bash benchmarks/device_bf16.sh
stamp done

cp "$WORK/strategies/strategies.json" "$WORK/strategies/strategies.md" "$OUT/" 2>/dev/null
cp "$WORK"/bench/*.json "$OUT/" 2>/dev/null
cp "$WORK/bench/docs-section.md" "$OUT/bench-docs-section.md" 2>/dev/null
cp "$WORK/bf16/bf16_drift.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/all.tar.gz" -C "$WORK" .
ls -la "$OUT"
