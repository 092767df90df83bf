#!/usr/bin/env bash
# The multi-seed study behind EXPERIMENTS.md: every part is one `gradshape compare`.
#
#   bash experiments/study.sh            # all parts, two at a time, into experiments/results/
#   JOBS=1 bash experiments/study.sh     # one at a time (each then uses every core)
#   bash experiments/study.sh vgg11-main # only the named parts
#
# Parts resume where they stopped (--resume), so an interrupted study is continued by running
# the same command again.  Then `python experiments/summarize.py` rewrites the tables.
set -euo pipefail
cd "$(dirname "$0")/.."

GS=${GS:-.venv/bin/gradshape}
OUT=${OUT:-experiments/results}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-5}

# Shared by every part: --val-fraction holds out 10 % of all 60,000 Fashion-MNIST training
# images (6,000) as the validation split used for every choice; --subset then trains on 6,000
# of the rest, a random draw per seed (the same for every method of that seed).  Every run is
# tested on the full 10,000-image test set; 4 epochs of 47 steps (batch 128, the last batch
# 112 images) make 188 steps.  summarize.py derives these numbers from results.json.
COMMON="--dataset fashion-mnist --subset 6000 --val-fraction 0.1 --pad-to 32 --epochs 4
 --batch-size 128 --refresh-warmup 1 --refresh-every 1 --refresh-batches 10 --k 5
 --seeds $SEEDS --no-progress --resume"
VGG="--model vgg11 --width 0.25 --drop-last-pool --lr 0.05"
RESNET="--model resnet18 --width 0.125 --lr 0.05"

declare -A PART=(
  [resnet18-main]="$RESNET --methods baseline,sgs,acb,dbb"
  [vgg11-main]="$VGG --methods baseline,sgs,acb,dbb"
  [resnet18-bn]="$RESNET --methods acb@bn=after_sum,grid"
  # ACB's G has mean 5/3: by Lemma 1, ACB with one BatchNorm after the branch sum
  # updates as SGS does with ACB's G normalised to mean 1 at 5/3 of the rate (0.05 · 5/3)
  [resnet18-lr]="--model resnet18 --width 0.125 --lr 0.0833 --methods baseline,grid"
  [vgg11-ablation]="$VGG --methods sgs-autocorr,grid@alpha=1.25@beta=1.5,grid,grid@alpha=2@beta=4"
  [vgg11-k]="$VGG --methods sgs@k=1,sgs@k=2,sgs@k=3,sgs@k=7"
  [vgg11-transforms]="$VGG --methods cdg,pgt,sgs+cdg,sgs+pgt"
  [optim-sgd]="$VGG --methods sgs@mode=update"
  [optim-adam]="--model vgg11 --width 0.25 --drop-last-pool --optimizer adam --lr 0.001
    --methods baseline,sgs,sgs@mode=update"
  [optim-adamw]="--model vgg11 --width 0.25 --drop-last-pool --optimizer adamw --lr 0.001
    --wd 0.05 --methods baseline,sgs,sgs@mode=update"
  [optim-adagrad]="--model vgg11 --width 0.25 --drop-last-pool --optimizer adagrad --lr 0.01
    --methods baseline,sgs,sgs@mode=update"
)
# The main tables first (the longest), then the parts that are paired against them.
ORDER=(resnet18-main vgg11-main vgg11-ablation vgg11-k vgg11-transforms optim-adam optim-adamw
       optim-adagrad optim-sgd resnet18-bn resnet18-lr)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${ORDER[@]}")
for p in "${parts[@]}"; do
  [ -n "${PART[$p]+x}" ] || { echo "study.sh: unknown part '$p' (parts: ${ORDER[*]})" >&2; exit 2; }
done

run_part() {  # one part; its log goes beside its results
  local name=$1
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086  # the flag strings are meant to split
  $GS compare $COMMON ${PART[$name]} --out "$OUT/$name" > "$OUT/$name/log.txt" 2>&1 \
    && echo "done: $name" || { echo "FAILED: $name (see $OUT/$name/log.txt)" >&2; return 1; }
}

# With several jobs, each process gets one thread: two single-threaded runs side by side
# train ~20 % more images per second on 2 cores than one run using both.
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export -f run_part
export GS OUT COMMON
for p in "${parts[@]}"; do
  printf '%s\0' "$p"
done | PART_DEFS="$(declare -p PART)" xargs -0 -P "$JOBS" -I{} bash -c 'eval "$PART_DEFS"; run_part "$1"' _ {}
