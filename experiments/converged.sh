#!/usr/bin/env bash
# The converged-regime study of EXPERIMENTS.md (issue 16): every part is one `gradshape compare`
# with the config files experiments/configs/converged/common.yaml and
# experiments/configs/converged/<part>.yaml.
#
#   nohup bash experiments/converged.sh > experiments/results/converged.log 2>&1 &
#   bash experiments/converged.sh conv-main        # only the named parts
#
# Parts resume where they stopped (--resume): running the same command again continues an
# interrupted study; a finished run is never trained again.  Parts run one after another in the
# order below (the most important first), each running JOBS runs side by side with one thread
# each; with COMMIT_REPO=<repository> each finished part's folder is committed there.  While a
# file $OUT/PAUSE exists, the next part waits.  EPOCHS
# replaces common.yaml's 50 epochs.
set -euo pipefail
cd "$(dirname "$0")/.."

GS=${GS:-.venv/bin/gradshape}
OUT=${OUT:-experiments/results}
JOBS=${JOBS:-2}
CONFIGS=experiments/configs/converged

ORDER=(conv-main conv-lr-0.025 conv-lr-0.1 conv-lemma1 conv-frozen conv-grid conv-autocorr-k
       conv-structures)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${ORDER[@]}")
for p in "${parts[@]}"; do
  [ -f "$CONFIGS/$p.yaml" ] && [ "$p" != common ] \
    || { echo "converged.sh: unknown part '$p' (parts: ${ORDER[*]})" >&2; exit 2; }
done

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for p in "${parts[@]}"; do
  # a file $OUT/PAUSE holds the next part back (e.g. to benchmark on idle cores in between)
  while [ -e "$OUT/PAUSE" ]; do sleep 30; done
  mkdir -p "$OUT/$p"
  # shellcheck disable=SC2086  # GS may be a command with arguments
  if $GS compare --config "$CONFIGS/common.yaml" --config "$CONFIGS/$p.yaml" \
      ${EPOCHS:+--optim.epochs "$EPOCHS"} --jobs "$JOBS" --progress false --resume \
      --out "$OUT/$p" >> "$OUT/$p/log.txt" 2>&1; then
    echo "done: $p"
    if [ -n "${COMMIT_REPO:-}" ]; then  # commit this part's folder, and nothing else
      git -C "$COMMIT_REPO" add "$OUT/$p" \
        && git -C "$COMMIT_REPO" commit -q -m "Converged study: part $p" -- "$OUT/$p" || true
    fi
  else
    echo "FAILED: $p (see $OUT/$p/log.txt)" >&2
  fi
done
