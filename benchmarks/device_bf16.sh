#!/usr/bin/env bash
# FPO's D at step 0 under bf16 autocast on a GPU (issue 10 item 4; docs/bf16_features.md).
#
# Runs benchmarks/bf16_feature_drift.py with a gemma-3-270m-SHAPED model with seeded random
# weights (the real weights are not on the device machine) and seeded random token pairs, the
# shipped TopK and JumpReLU layer-17 SAEs (assets/sae), 16 pairs measured against one padded
# reference batch, policy batches of 1, 2, 4, 8 and 16 pairs (16 = the reference's own batch:
# D must be exactly 0 there), fp32 vs bf16 autocast on each side. Writes $OUT/bf16_drift.json
# (+ .log). Needs the repo's src on PYTHONPATH and torch, transformers, sae-lens installed;
# nothing from the network. About a minute on an H100; killed after BF16_TIMEOUT seconds.
#
#   OUT=/tmp/out bash benchmarks/device_bf16.sh                   # on the GPU machine
#   OUT=/tmp/out bash benchmarks/device_bf16.sh --device cpu --pairs 4 --policy-pairs 1 4
#
# Extra arguments go to the Python module after the defaults (a repeated option wins).
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the JSON}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"

timeout -k 10 "${BF16_TIMEOUT:-150}" "${PYTHON:-python3}" -m benchmarks.bf16_feature_drift \
    --model random-gemma3-270m --device cuda --pairs 16 --policy-pairs 1 2 4 8 16 \
    --max-length 64 --seed 0 --out "$OUT/bf16_drift.json" "$@" >"$OUT/bf16_drift.log" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "device_bf16: failed (exit $rc; 124 = timed out); last lines of $OUT/bf16_drift.log:"
    tail -n 20 "$OUT/bf16_drift.log"
else
    echo "device_bf16: wrote $OUT/bf16_drift.json"
    "${PYTHON:-python3}" -m benchmarks.bf16_feature_drift --summarize "$OUT/bf16_drift.json"
fi
exit "$rc"
