#!/usr/bin/env bash
# Download the Python 3.12 x86-64 wheels benchmarks/device.sh installs on the GPU machine
# (its image has python3.12, torch 2.11, lightning 2.6.6, torchmetrics, accelerate 1.15,
# transformers 5.17, huggingface_hub 1.33, tokenizers 0.23.2, pyarrow, pandas, xxhash,
# jaxtyping, einops; nothing can be fetched there). Run from the repository root:
#     bash benchmarks/device_wheels.sh [DEST]      # DEST defaults to .whl
# Only what the benchmark imports is carried (installed there with --no-deps): sae-lens's
# and transformer-lens's other requirements (plotly, nltk, wandb, ...) are never imported.
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
py="${PYTHON:-python3}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
wheels=(
  transformers==5.24.0 trl==1.16.0
  hydra-core==1.3.8 omegaconf==2.3.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3
  simple-parsing==0.1.9 docstring-parser==0.18.0
  liger-kernel==0.8.5
)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) exists only as a source archive: build
# its pure-Python wheel here.
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" antlr4-python3-runtime==4.9.3
ls -la "$dest"
du -ch "$dest"/*.whl | tail -1
