#!/usr/bin/env bash
# The multi-seed study behind EXPERIMENTS.md: every part is one `gradshape compare` with the
# config files experiments/configs/study/common.yaml and experiments/configs/study/<part>.yaml.
#
#   bash experiments/study.sh            # all parts, two at a time, into experiments/results/
#   JOBS=1 bash experiments/study.sh     # one at a time (each then uses every core)
#   bash experiments/study.sh vgg11-main # only the named parts
#   SEEDS=3 bash experiments/study.sh    # another number of seeds than common.yaml's 5
#
# Parts resume where they stopped (--resume), so an interrupted study is continued by running
# the same command again.  Then `python experiments/summarize.py` rewrites the tables.
set -euo pipefail
cd "$(dirname "$0")/.."

GS=${GS:-.venv/bin/gradshape}
OUT=${OUT:-experiments/results}
JOBS=${JOBS:-2}
CONFIGS=experiments/configs/study

# The main tables first (the longest), then the parts that are paired against them.
ORDER=(resnet18-main vgg11-main vgg11-ablation vgg11-k vgg11-transforms optim-adam optim-adamw
       optim-adagrad optim-sgd resnet18-bn resnet18-lr)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${ORDER[@]}")
for p in "${parts[@]}"; do
  [ -f "$CONFIGS/$p.yaml" ] && [ "$p" != common ] \
    || { echo "study.sh: unknown part '$p' (parts: ${ORDER[*]})" >&2; exit 2; }
done

run_part() {  # one part; its log goes beside its results
  local name=$1
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086  # GS may be a command with arguments
  $GS compare --config "$CONFIGS/common.yaml" --config "$CONFIGS/$name.yaml" \
      ${SEEDS:+--seeds "$SEEDS"} --progress false --resume --out "$OUT/$name" \
      > "$OUT/$name/log.txt" 2>&1 \
    && echo "done: $name" || { echo "FAILED: $name (see $OUT/$name/log.txt)" >&2; return 1; }
}

# With several jobs, each process gets one thread: two single-threaded runs side by side
# train ~20 % more images per second on 2 cores than one run using both.
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export -f run_part
export GS OUT CONFIGS SEEDS="${SEEDS:-}"
for p in "${parts[@]}"; do
  printf '%s\0' "$p"
done | xargs -0 -P "$JOBS" -I{} bash -c 'run_part "$1"' _ {}
