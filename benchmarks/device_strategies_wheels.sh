#!/usr/bin/env bash
# Download what benchmarks/device_strategies.sh needs on the GPU image beyond what it has
# (Python 3.12, torch 2.11, lightning 2.6.6, transformers 5.17, huggingface_hub 1.33, ...):
# py3.12 wheels, plus the two packages PyPI has only as source (deepspeed,
# antlr4-python3-runtime), which device_strategies.sh installs there without a network.
# Run it here, in the repository root, with network; it fills .whl/ (git-ignored through
# .git/info/exclude) and prints the total size. wandb is not carried (~20 MB): sae-lens only
# imports it, and benchmarks/strategy_step.py puts an empty module in its place.
#   bash benchmarks/device_strategies_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHON=${PYTHON:-python3}
DEST=.whl
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")" "$DEST"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >>"$exclude"

# The pins of pyproject.toml (and the versions the other device scripts carry); each import
# dependency that the image lacks, at the version our .venv runs.
WHEELS=(
  transformers==5.24.0
  sae-lens==6.54.12
  transformer-lens==3.9.0
  hydra-core==1.3.8
  omegaconf==2.3.1
  better-abc==0.0.3
  simple-parsing==0.1.9
  docstring-parser==0.18.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  # transformers 5.24 checks regex>=2025.10.22 at import; the image's version is not known
  regex==2026.11.19
  # deepspeed's own needs the image lacks
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
)
SDISTS=(
  deepspeed==0.19.8
  antlr4-python3-runtime==4.9.3
)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$DEST" "${SDISTS[@]}"
ls -l "$DEST"
du -cb "$DEST"/* | tail -1 | awk '{printf "total: %.1f MB\n", $1 / 1e6}'
