#!/usr/bin/env bash
# The converged-regime study of EXPERIMENTS.md (issue 16): every part is one `gradshape compare`.
#
#   nohup bash experiments/converged.sh > experiments/results/converged.log 2>&1 &
#   bash experiments/converged.sh conv-main        # only the named parts
#
# Parts resume where they stopped (--resume): running the same command again continues an
# interrupted study; a finished run is never trained again.  Parts run one after another in the
# order below (the most important first), each running JOBS runs side by side with one thread
# each; with COMMIT_REPO=<repository> each finished part's folder is committed there.
set -euo pipefail
cd "$(dirname "$0")/.."

GS=${GS:-.venv/bin/gradshape}
OUT=${OUT:-experiments/results}
JOBS=${JOBS:-2}
EPOCHS=${EPOCHS:-50}

# Fashion-MNIST: 10 % of the 60,000 training images (6,000) held out for validation, 3,000 of
# the rest (a random draw per seed, the same for every method of that seed) trained on with
# crop and flip for 50 epochs (the pilot's choice: the model fits them); the full test set,
# evaluated once at the end.  VGG-11 at width 0.25 without
# its last pool, SGD 0.05 with momentum 0.9, cosine after one warm-up epoch, weight decay 5e-4.
# SGS: the paper's schedule in kind, a warm-up epoch, then a refresh at epoch 1 and at every
# epoch divisible by 5 (10 refreshes in 50 epochs), from 10 random training batches, NMI, k = 5.
COMMON="--dataset fashion-mnist --subset 3000 --val-fraction 0.1 --pad-to 32 --epochs $EPOCHS
 --batch-size 128 --model vgg11 --width 0.25 --drop-last-pool --wd 5e-4 --eval-every 0
 --refresh-warmup 1 --refresh-every 5 --refresh-batches 10 --refresh-align paper --k 5
 --no-progress --resume --jobs $JOBS"

declare -A PART=(
  [conv-main]="--lr 0.05 --methods baseline,sgs --seeds 10"
  [conv-lr-0.025]="--lr 0.025 --methods baseline,sgs --seeds 5"
  [conv-lr-0.1]="--lr 0.1 --methods baseline,sgs --seeds 5"
  # Lemma 1 end to end: ACB with one BatchNorm after the branch sum against plain training
  # with ACB's unnormalised G = [[1,2,1],[2,3,2],[1,2,1]] at the same rate and decay
  [conv-lemma1]="--lr 0.05 --methods acb@bn=after_sum,branch@kind=acb --seeds 3"
  # G measured once at epoch 1 and never again (refresh_every beyond the last epoch)
  [conv-frozen]="--lr 0.05 --methods sgs@refresh_every=1000 --seeds 5"
  # grid points around and beyond NMI's deep-layer centre (about 5)
  [conv-grid]="--lr 0.05 --methods grid@alpha=5@beta=10,grid@alpha=10@beta=100,grid@alpha=0.8@beta=0.8 --seeds 3"
  # the autocorrelation measure's k, chosen on the validation split as the paper does
  [conv-autocorr-k]="--lr 0.05 --methods sgs-autocorr --k 1,2,3,4,5,6 --seeds 2"
  [conv-structures]="--lr 0.05 --methods acb,dbb,dyrep,repopt --seeds 3"
)
ORDER=(conv-main conv-lr-0.025 conv-lr-0.1 conv-lemma1 conv-frozen conv-grid conv-autocorr-k
       conv-structures)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${ORDER[@]}")
for p in "${parts[@]}"; do
  [ -n "${PART[$p]+x}" ] || { echo "converged.sh: unknown part '$p' (parts: ${ORDER[*]})" >&2; exit 2; }
done

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for p in "${parts[@]}"; do
  mkdir -p "$OUT/$p"
  # shellcheck disable=SC2086  # the flag strings are meant to split
  if $GS compare $COMMON ${PART[$p]} --out "$OUT/$p" >> "$OUT/$p/log.txt" 2>&1; then
    echo "done: $p"
    if [ -n "${COMMIT_REPO:-}" ]; then  # commit this part's folder, and nothing else
      git -C "$COMMIT_REPO" add "$OUT/$p" \
        && git -C "$COMMIT_REPO" commit -q -m "Converged study: part $p" -- "$OUT/$p" || true
    fi
  else
    echo "FAILED: $p (see $OUT/$p/log.txt)" >&2
  fi
done
