#!/usr/bin/env bash
# The `split` instability (issue 16, item 3): many seeds x --bn-stats mode, the first epoch of the stats study's
# schedule (PreActResNet-18 width 16, batch 128, lr 0.1 cosine over 8 epochs, RobMask PGD-7 at 8/255), on a fixed
# balanced 2,560 of the real CIFAR-10 training images (20 steps in epoch 1). Each run is stopped once epoch 1 is
# logged. --log-every 0 prints the running mean loss after every step, from which each step's loss follows.
# Usage: DATA=<cifar10 folder> bash results/split-cpu/sweep.sh VARIANT MODES SEEDS   (run from the repository root)
#   VARIANT: base | warmup (--warmup 1) | attackbn (--attack-bn train) | halfsum (lr 0.05, wd 1e-3: the branch mean)
set -uo pipefail
variant=$1 modes=$2 seeds=$3 out=${OUT:-runs/split}
mkdir -p "$out"
case $variant in
  base) extra=() ;;
  warmup) extra=(--warmup 1) ;;
  attackbn) extra=(--attack-bn train) ;;
  halfsum) extra=(--lr 0.05 --wd 1e-3) ;;
  *) echo "unknown variant $variant" >&2; exit 2 ;;
esac
for mode in ${modes//,/ }; do
  for seed in ${seeds//,/ }; do
    run=$out/$variant-$mode-s$seed
    [[ -s $run/log.jsonl ]] && { echo "[skip] $run"; continue; }
    .venv/bin/python robmask.py train --dataset cifar10 --data-dir "$DATA" --arch preactresnet18 --width 16 \
      --subset 2560 --test-n 100 --epochs 8 --method robmask --bn-stats "$mode" --seed "$seed" --channels-last \
      --log-every 0 "${extra[@]}" --out "$run" --force > "$run.log" 2>&1 &
    pid=$!
    until [[ -s $run/log.jsonl ]] || ! kill -0 $pid 2>/dev/null; do sleep 1; done
    kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null
    echo "$run: $(head -1 "$run/log.jsonl" 2>/dev/null || tail -1 "$run.log")"
  done
done
