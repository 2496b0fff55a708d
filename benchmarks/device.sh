#!/usr/bin/env bash
# The GPU benchmark in ONE device call of about 8 minutes (one H100). From the repository
# root, with the wheels of benchmarks/device_wheels.sh in .whl/ (carry [".whl"]):
#     bash benchmarks/device.sh
# Installs the wheels into /tmp/site (no network there), runs python -m benchmarks.run --device cuda
# on the Gemma-2-2B shape (random weights on the GPU, bf16 autocast over fp32 weights,
# 2 pairs x 2 accumulation, 256-token prompts, 768 tokens in all) with a short schedule, and
# leaves under $OUT: the results JSON (written after every configuration, so a timeout keeps
# what ran), the log, and the markdown section (docs-section.md) to paste into docs/.
set -uo pipefail
out="${OUT:-/tmp/bench-out}"
mkdir -p "$out"
# (once per machine: a second call on the same warm machine reuses /tmp/site)
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && : >/tmp/site/.installed || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# sae-lens imports wandb at import time only (the benchmark logs nothing); wandb is not on
# the device machine and ~20 MB as a wheel, so an empty module stands in for it there.
if ! python3 -c "import wandb" 2>/dev/null; then
  mkdir -p /tmp/wandb-stub/wandb && : >/tmp/wandb-stub/wandb/__init__.py
  export PYTHONPATH="/tmp/wandb-stub:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$out/versions.txt" || exit 1
import importlib.metadata as md
import datasets, hydra, sae_lens, torch, transformers, trl  # noqa: F401 (import check)
for name in ("torch", "transformers", "trl", "lightning", "accelerate", "datasets",
             "pyarrow", "fsspec", "huggingface_hub", "tokenizers", "sae-lens"):
    print(name, md.version(name))
PY
# Short schedule (one round, 1 warm-up + 3 measured steps, about 40 s per configuration):
# only what the issue's targets compare, the most important first (the JSON is rewritten
# after every configuration, so a cut-off run keeps what finished). Spread rows: ours vs
# TRL's defaults (checkpointing on), FPO cached vs SimPO, packing; fixed rows: ours vs TRL
# with checkpointing off. Drop the plan.* settings to run everything when time allows.
# Arguments replace the --set list below (e.g. a profile: profile=$OUT/prof ...).
if [ $# -eq 0 ]; then
  set -- --set cuda.rounds=1 cuda.gemma2_2b.warmup=1 cuda.gemma2_2b.steps=3 \
    'row_sets=[spread,fixed]' \
    'plan.spread.ours=[DPO online,SimPO,FPO cached,SimPO (packed)]' \
    'plan.spread.trl=[TRL DPO online,TRL SimPO,TRL DPO online (liger)]' \
    'plan.spread.trl_checkpointing=[true]' \
    'plan.fixed.ours=[DPO online,SimPO]' \
    'plan.fixed.trl=[TRL DPO online,TRL SimPO,TRL DPO online (liger)]' \
    'plan.fixed.trl_checkpointing=[false]'
fi
timeout "${BENCH_TIMEOUT:-480}" python3 -m benchmarks.run --device cuda --out "$out" \
  --docs "$out/docs-section.md" "$@" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
ls -la "$out"
exit "$status"
