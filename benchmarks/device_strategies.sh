#!/usr/bin/env bash
# One GPU call: a few optimizer steps of the paper setting (Gemma-2-2B shape, random weights,
# Gemma Scope-shaped random SAE, synthetic rows at the configured max lengths) under each
# trainer strategy, FPO first, then DPO; per run peak CUDA memory, step times and whether the
# fp32 master weights changed (benchmarks/strategy_step.py). Writes four files to $OUT (the
# device tool returns at most 8): strategies.json (every run's measurements, a failed run's
# error and log tail), strategies.md (a table), setup.log (versions, installs) and
# logs.tar.gz (each run's full log). It never hangs: each run is its own process under
# `timeout`, and runs that would not start in time inside the total budget are recorded as
# skipped.
#
# Prepare here (network): bash benchmarks/device_strategies_wheels.sh   (fills .whl/, ~22 MB)
# On the device (carry .whl):  bash benchmarks/device_strategies.sh
# Knobs (environment): BUDGET_S (total, default 270), RUN_TIMEOUT_S (per run, default 110),
# STEPS (optimizer steps per run, default 4), STRATEGIES, OBJECTIVES, EXTRA (more
# strategy_step.py options, e.g. "--tiny --cpu" for a CPU check of this script), INSTALL=0
# (use what is installed), PYTHON, SITE (where the carried packages go, default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/device_strategies}
BUDGET_S=${BUDGET_S:-270}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-110}
STEPS=${STEPS:-4}
STRATEGIES=${STRATEGIES:-"single fsdp fsdp_fp32_reference deepspeed_zero2 deepspeed_zero3"}
OBJECTIVES=${OBJECTIVES:-"fpo dpo"}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
RUNS=${RUNS:-/tmp/device_strategies_runs}
mkdir -p "$OUT" "$RUNS"
SETUP_LOG="$OUT/setup.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1

# 1. Packages the image lacks: wheels, then the two source-only ones (no build isolation, no
#    network; DeepSpeed without pre-built ops: its ZeRO runs on the torch optimizer).
if [[ ${INSTALL:-1} == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >>"$SETUP_LOG" 2>&1 || echo "wheel install failed" | tee -a "$SETUP_LOG"
  if compgen -G ".whl/*.tar.gz" >/dev/null; then
    PYTHONPATH="$SITE" DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PYTHON" -m pip install -q \
      --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
      .whl/*.tar.gz >>"$SETUP_LOG" 2>&1 || echo "sdist install failed" | tee -a "$SETUP_LOG"
  fi
fi
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY' 2>&1 | tee -a "$SETUP_LOG"
import importlib

importlib.import_module("benchmarks.strategy_step").stub_wandb()  # as the runs do (sae-lens imports it)
for name in ("torch", "lightning", "transformers", "sae_lens", "hydra", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - recorded, the runs say the rest
        print(name, "NOT IMPORTABLE:", type(error).__name__, error)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee -a "$SETUP_LOG"
echo "setup $(($(date +%s) - START)) s" | tee -a "$SETUP_LOG"

# 2. One process per run, each under its own timeout, inside the total budget.
for objective in $OBJECTIVES; do
  for strategy in $STRATEGIES; do
    json="$RUNS/${strategy}_${objective}.json"
    log="$RUNS/${strategy}_${objective}.log"
    left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 45)); then
      printf '{"strategy": "%s", "objective": "%s", "status": "skipped", "error": "%s"}\n' \
        "$strategy" "$objective" "total budget spent (${left}s left)" >"$json"
      continue
    fi
    limit=$((left < RUN_TIMEOUT_S ? left : RUN_TIMEOUT_S))
    echo "== $strategy / $objective (timeout ${limit}s)"
    # shellcheck disable=SC2086  # EXTRA holds several options
    timeout -k 10 "$limit" "$PYTHON" -m benchmarks.strategy_step --strategy "$strategy" \
      --objective "$objective" --steps "$STEPS" --workdir "/tmp/strategy_step/$strategy" \
      --out "$json" $EXTRA >"$log" 2>&1
    rc=$?
    tail -n 1 "$log" | cut -c 1-600
    if [[ ! -s "$json" ]]; then  # killed before it could write: say so
      printf '{"strategy": "%s", "objective": "%s", "status": "failed", "error": "%s"}\n' \
        "$strategy" "$objective" "exit $rc (124: timed out after ${limit}s); see the log" >"$json"
    fi
  done
done

# 3. All results in one JSON and a markdown table.
tar -czf "$OUT/logs.tar.gz" -C "$RUNS" . 2>/dev/null
"$PYTHON" - "$OUT" "$RUNS" <<'PY'
import json, sys
from pathlib import Path

out, runs_dir = Path(sys.argv[1]), Path(sys.argv[2])
runs = []
for path in sorted(runs_dir.glob("*.json")):
    run = json.loads(path.read_text())
    log = path.with_suffix(".log")
    if run.get("status") != "ok" and log.is_file():
        run["log_tail"] = log.read_text(errors="replace")[-3000:]
    runs.append(run)
(out / "strategies.json").write_text(json.dumps(runs, indent=2))
def fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"
lines = ["| objective | strategy | status | peak allocated (GiB) | peak reserved (GiB) | "
         "median step (s) | steps | master weights changed | bf16-visible change | loss |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for r in sorted(runs, key=lambda r: (r["objective"], r["strategy"])):
    weights = r.get("weights", {})
    visible = [w["bf16_visible_fraction"] for w in weights.values()]
    losses = r.get("losses") or []
    lines.append(
        f"| {r['objective']} | {r['strategy']} | {r['status']} | "
        f"{fmt(r.get('peak_allocated_gib'), '.1f')} | {fmt(r.get('peak_reserved_gib'), '.1f')} | "
        f"{fmt(r.get('median_step_seconds_after_first'), '.2f')} | {r.get('optimizer_steps', '-')} | "
        f"{r.get('weights_changed', '-')} | {fmt(min(visible) if visible else None, '.3f')} | "
        f"{fmt(losses[-1] if losses else None, '.4f')} |"
    )
    if r["status"] != "ok":
        error = " ".join(str(r.get("error", "")).split())[:300].replace("|", "/")
        lines.append(f"|  | error: {error} |||||||||")
(out / "strategies.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "total $(($(date +%s) - START)) s"
