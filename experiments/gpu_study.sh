#!/usr/bin/env bash
# The GPU study of EXPERIMENTS.md (issue 16, section 4), for one GPU:
#
#   nohup bash experiments/gpu_study.sh > experiments/results/gpu.log 2>&1 &
#
# First one epoch of the baseline is trained and timed (in experiments/results/gpu-calibration);
# the epoch count is then the largest that fits BUDGET_HOURS for all runs of
# experiments/configs/gpu/study.yaml (3 methods x 8 seeds; ACB costs about COST_ACB plain
# epochs, SGS about 1.05), JOBS runs sharing the device, clamped to [MIN_EPOCHS, MAX_EPOCHS].
# EPOCHS=N skips the calibration.  The comparison resumes (--resume): the same command
# continues an interrupted study.  Settings a user may change: GS, OUT, JOBS, BUDGET_HOURS.
set -euo pipefail
cd "$(dirname "$0")/.."

GS=${GS:-.venv/bin/gradshape}
OUT=${OUT:-experiments/results}
JOBS=${JOBS:-4}
BUDGET_HOURS=${BUDGET_HOURS:-8}
MIN_EPOCHS=${MIN_EPOCHS:-30}
MAX_EPOCHS=${MAX_EPOCHS:-60}
COST_ACB=${COST_ACB:-2.2}
CONFIG=${CONFIG:-experiments/configs/gpu/study.yaml}

if [ -z "${EPOCHS:-}" ]; then
  calib="$OUT/gpu-calibration"
  # shellcheck disable=SC2086  # GS may be a command with arguments
  $GS compare --config "$CONFIG" --methods baseline --seeds 1 --optim.epochs 1 \
    --eval_every 0 --progress false --overwrite --out "$calib" > /dev/null
  EPOCHS=$(python3 - "$calib/results.json" "$BUDGET_HOURS" "$JOBS" "$COST_ACB" \
    "$MIN_EPOCHS" "$MAX_EPOCHS" <<'PY'
import json, sys
record, hours, jobs, acb, low, high = sys.argv[1:]
epoch = json.load(open(record))[0]["train_seconds"]
# 8 seeds of baseline (1), SGS (1.05) and ACB; JOBS runs share the device, assumed to add
# no throughput beyond one run's (a small model may gain from sharing: then it ends early).
cost = 8 * (1 + 1.05 + float(acb)) * epoch
epochs = int(float(hours) * 3600 / cost)
print(max(int(low), min(int(high), epochs)))
print(f"one epoch: {epoch:.1f} s; {epochs} epochs fit {hours} h", file=sys.stderr)
PY
)
fi
echo "gpu study: $EPOCHS epochs, $JOBS runs at once"
mkdir -p "$OUT/gpu-main"
# shellcheck disable=SC2086
$GS compare --config "$CONFIG" --optim.epochs "$EPOCHS" --jobs "$JOBS" --progress false \
  --resume --out "$OUT/gpu-main" >> "$OUT/gpu-main/log.txt" 2>&1
echo "done: gpu-main ($OUT/gpu-main/report.md)"
