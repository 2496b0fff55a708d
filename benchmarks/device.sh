#!/usr/bin/env bash
# The GPU benchmark in ONE device call of about 6 minutes (one H100). From the repository
# root, with the wheels of benchmarks/device_wheels.sh in .whl/ (carry [".whl"]):
#     bash benchmarks/device.sh
# Installs the wheels into /tmp/site (no network there), runs benchmarks/run.py --device cuda
# on the Gemma-2-2B shape (random weights on the GPU, bf16 autocast over fp32 weights,
# 2 pairs x 2 accumulation, 256-token prompts, 768 tokens in all) with a short schedule, and
# leaves under $OUT: the results JSON (written after every configuration, so a timeout keeps
# what ran), the log, and the markdown section (docs-section.md) to paste into docs/.
set -uo pipefail
out="${OUT:-/tmp/bench-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$out/versions.txt" || exit 1
import importlib.metadata as md
import datasets, hydra, sae_lens, torch, transformers, trl  # noqa: F401 (import check)
for name in ("torch", "transformers", "trl", "lightning", "accelerate", "datasets",
             "pyarrow", "fsspec", "huggingface_hub", "tokenizers", "sae-lens"):
    print(name, md.version(name))
PY
# Short schedule (about 5 minutes): 1 round, 1 warm-up + 3 measured steps, the configurations
# the issue's targets name. Drop a --set to widen it when there is more device time.
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/run.py --device cuda --out "$out" \
  --docs "$out/docs-section.md" \
  --set cuda.rounds=1 cuda.gemma2_2b.warmup=1 cuda.gemma2_2b.steps=3 \
  'ours=[DPO online,SimPO,FPO cached]' 'trl=[TRL DPO online,TRL SimPO]' \
  2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
ls -la "$out"
exit "$status"
