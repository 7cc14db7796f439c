#!/usr/bin/env bash
# run_all.sh: every CIFAR and ImageNet experiment of the RobMask paper, as robmask.py commands.
#
#   bash run_all.sh --smoke      on a GPU machine, first: does everything work here? (about 3 minutes, one line per part)
#   bash run_all.sh [--quick] [--dry-run] [--only STAGE[,STAGE...]]
#                   [--data DIR] [--data100 DIR] [--imagenet DIR] [--nproc N] [--runs DIR]
#
# Stages, in the paper's order:
#   table1  ResNet-18 CIFAR-10: standard, adversarial, and BN-only fine-tuning (affine, γ, β, stats; γ with the
#           statistics frozen)
#   fig1    BN parameters of the first BN layer: adversarial model vs its clean-fine-tuned copy
#   fig4    feature maps after the first BN+ReLU for the same pair
#   table2  the two-checkpoint trade-off sweep, p = 0, 0.1, ..., 1
#   table3  CIFAR-10/100 x {preactresnet18, resnext29, densenet121} x {bn, advprop, robmask} x {20, 100 epochs}
#           (the paper names "Preact ResNet", "ResNeXt" and DenseNet: PreActResNet-18 and ResNeXt-29 2x64d are our guesses)
#   table4  ImageNet ResNet-18, 105 epochs, {bn, advprop, robmask}, through torchrun
#   table5  PGD-100 accuracy at ε = 0..8/255 for {adv, advprop, robmask}, ResNet-18 CIFAR-10
#   table6  AutoAttack on the same sweep, plus RobMask with ε_max = 10/255
#   table7  DenseNet-121 CIFAR-10: advprop, advprop-random, advprop-multi, robmask
#   table8  RobMask over three seeds (PreActResNet-18, CIFAR-10; the architecture is our guess)
#   fig3    training curves, RobMask vs AdvProp, DenseNet-121
#   timing  seconds per epoch, AdvProp vs RobMask (DenseNet-121)
#   stats   the --bn-stats study (not in the paper): bn, advprop and robmask under each of mixed, split and
#           shared, three seeds, one architecture, data and schedule; clean accuracy at u(0) on the full test
#           set, PGD-20 at 8/255 on a balanced 1000 with the clean and the matched mask; robmask mixed also
#           with --recalibrate (precise BN)
#   regime  the overfitting-regime study (issue 16, not in the paper): bn, advprop and robmask with one schedule of
#           E epochs long enough for BN to fit its training set, in two arms (ε_max 8/255 with PGD-7, the paper's;
#           2/255 with PGD-2, where AdvProp reported gains), robmask also at E/5 epochs (the paper's convergence
#           claim), and BN given robmask's wall time (more epochs: E x the measured time ratio); 3 paired seeds.
#           Each run: clean accuracy at u(0) on the whole test set, PGD-20 at the arm's ε with the matched mask on
#           a balanced 1000, and the final training accuracy (in log.jsonl). With --quick: the CPU preset (width 16, 500
#           images, E = 200, one run at a time); without: the GPU preset (width 64, 2,000 images, E = 60, JOBS = 9
#           runs side by side on one GPU, BN compute-matched by counted FLOPs; about 9 minutes on an H200, estimated)
# Then `robmask.py report` writes RUNS/RESULTS.md.
#
# Settings (a flag beats the environment variable):
#   DATA      CIFAR-10: torchvision's folder or train/ test/ class folders  (default data/cifar10;
#             the value "synthetic" uses robmask.py's built-in synthetic set)
#   DATA100   CIFAR-100 (default data/cifar100)
#   IMAGENET  ImageNet with train/ and val/ (default data/imagenet)
#   NPROC     processes for the ImageNet torchrun (default: the number of GPUs, or 1)
#   RUNS      output folder (default runs/full, or runs/quick with --quick)
#   PY        the Python to use (default .venv/bin/python if present, else python3)
#   FAST      training speed flags (default "--amp --channels-last", plus --compile where nvidia-smi lists a GPU, but
#             not for regime's side-by-side runs; FAST= turns them off)
#   With --quick only: SMALL (model/data size of table3/7/8), R18 (of the ResNet-18 tables), LONG, SHORT
#   (their epochs), R18_EPOCHS. At both scales: REGIME (data/model of `regime`), REGIME_EPOCHS, and JOBS (regime's
#   runs at once: 1 with --quick, 9 without; above 1 its matched BN gets RobMask's counted FLOPs, not its wall time),
#   REGIME_SEEDS (default 0,1,2; more seeds for an undecided cell, paired across its methods: 3,4,5).
# A dataset whose folder does not exist is skipped, with a message; `mkdir -p data/cifar10 data/cifar100`
# lets torchvision download CIFAR on a machine that is online.
#
# Every command is idempotent: a complete run is skipped, an interrupted one resumed (train --resume), an
# evaluation or figure that exists is kept (they are written atomically). Running the script twice does
# no work twice. It stops at the first error and names the stage.
set -euo pipefail
cd "$(dirname "$0")"

QUICK=0 DRY=0 SMOKE=0 ONLY=""
value() {  # value FLAG "$@": the flag's value, or a one-line error when it has none
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || { echo "run_all.sh: $1 needs a value (see --help)" >&2; exit 2; }
}
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    --only) value "$@"; ONLY=$2; shift ;;
    --data) value "$@"; DATA=$2; shift ;;
    --data100) value "$@"; DATA100=$2; shift ;;
    --imagenet) value "$@"; IMAGENET=$2; shift ;;
    --nproc) value "$@"; NPROC=$2; shift ;;
    --runs) value "$@"; RUNS=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
ALL="table1 fig1 fig4 table2 table3 table4 table5 table6 table7 table8 fig3 timing stats regime"
ONLY_GIVEN=$ONLY
ONLY=$(echo "$ONLY" | tr ' ' ',' | tr -s ',' | sed 's/^,//; s/,$//')  # "table1 table2", "table1,,table2": the same
for s in ${ONLY//,/ }; do
  [[ " $ALL " == *" $s "* ]] || { echo "run_all.sh: unknown stage $s; stages: $ALL" >&2; exit 2; }
done
if [[ -n $ONLY_GIVEN && -z $ONLY ]]; then
  echo "run_all.sh: --only '$ONLY_GIVEN' names no stage; stages: $ALL" >&2; exit 2
fi
DATA=${DATA:-data/cifar10} DATA100=${DATA100:-data/cifar100} IMAGENET=${IMAGENET:-data/imagenet}
if [[ -z ${PY:-} ]]; then [[ -x .venv/bin/python ]] && PY=.venv/bin/python || PY=python3; fi
if [[ -z ${NPROC:-} ]]; then NPROC=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); ((NPROC > 0)) || NPROC=1; fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: --nproc/NPROC must be a positive integer, not '$NPROC'" >&2; exit 2; }

if ((SMOKE)); then  # the CUDA tests, then a tiny synthetic pipeline through every GPU code path, with --compile
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || {
    echo "run_all.sh --smoke: no CUDA device is visible here (torch.cuda.is_available() is False); the smoke check is for GPU machines"
    exit 1; }
  S=${RUNS:-runs/smoke} FAILED=0
  mkdir -p "$S"
  export TORCH_LOGS=recompiles,graph_breaks  # a recompilation as p changes, or a graph break, shows in the train log
  part() {  # part NAME COMMAND...: one verdict line; the output goes to $S/NAME.log
    local t0=$SECONDS
    if "${@:2}" > "$S/$1.log" 2>&1; then echo "smoke: $1 ok ($((SECONDS - t0)) s)"
    else echo "smoke: $1 FAILED ($((SECONDS - t0)) s): see $S/$1.log"; FAILED=1; fi
  }
  TINY=(--dataset synthetic --width 8 --subset 512 --test-n 256 --batch-size 128 --attack-steps 3)
  part cuda-tests "$PY" -m pytest -q -m cuda test_robmask.py
  part train "$PY" robmask.py train "${TINY[@]}" --epochs 2 --method robmask --amp --channels-last --compile --force \
    --out "$S/cifar10-preactresnet18-robmask-long-s0"
  CK=$S/cifar10-preactresnet18-robmask-long-s0/checkpoint.pt
  # three graphs of the whole network (attack, training branch, evaluation): the first compile and 2 recompiles for
  # the modes, none per block, none as p or the epoch changes, no graph break, and the recompile limit never reached
  part recompiles bash -c "((\$(grep -c 'Recompiling function' '$S/train.log') <= 2)) && ! grep -Ei 'graph break|recompile_limit|cache_size_limit' '$S/train.log'"
  part eval-pgd "$PY" robmask.py eval "$CK" --attack pgd --eps 0,8/255 --steps 10 --mask matched --amp --out "$S/eval-pgd.json"
  part eval-autoattack "$PY" robmask.py eval "$CK" --attack autoattack --aa-version custom --aa-attacks apgd-ce --eps 8/255 \
    --n 64 --mask matched --out "$S/eval-aa.json"
  part tradeoff "$PY" robmask.py tradeoff "$CK" --p 0,0.5,1 --steps 5 --amp --out "$S/tradeoff.json"
  rm -f "$S/exported.pt"
  part export "$PY" robmask.py export "$CK" --mask clean --out "$S/exported.pt"
  part bench "$PY" robmask.py bench --amp --channels-last --compile --steps 5 --out "$S/bench.json"
  part report "$PY" robmask.py report "$S" --out "$S/RESULTS.md"
  ((FAILED)) && echo "run_all.sh --smoke: some parts failed (logs in $S)" || echo "run_all.sh --smoke: all parts passed (logs in $S)"
  exit $FAILED
fi

# bf16 autocast and channels_last: about 2x faster on GPUs and on CPUs with bf16 units (measured by bench)
# On GPUs also --compile: the masked layer turns a ResNet-18 training forward into 411 small aten ops (111 with
# plain BN), which leaves a GPU waiting on kernel launches; torch.compile fuses them into 3 graphs, and p changes
# no graph (u is a buffer, an input to the graph). Judged without a GPU: op counts and graph breaks counted on
# the CPU, and no recompilation in the CPU test; the smoke check shows whether it recompiles on yours.
# TF32 and cudnn.benchmark are set by robmask.py itself whenever it runs on CUDA. Evaluation runs under --amp
# on GPUs (EVAL_AMP; PGD-100 in bf16), in fp32 on CPUs, where the published CPU numbers came from.
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
DEFAULT_FAST="--amp --channels-last" EVAL_AMP=()
((GPUS > 0)) && DEFAULT_FAST+=" --compile" && EVAL_AMP=(--amp)
FAST_SET=${FAST+1}  # did the user choose FAST? (regime's side-by-side runs then take it as given)
read -r -a FAST <<< "${FAST-$DEFAULT_FAST}"
# Scale. Full: the paper's settings. Quick: the same pipeline at CPU scale (2 cores: about 45 minutes for the paper's stages, plus about 2 hours for `stats`),
# most of the time going to table1/table2, whose effect needs an adversarial ResNet-18 of width 16
# trained on about 10k images for 8 epochs.
SWEEP=0,1/255,2/255,3/255,4/255,5/255,6/255,7/255,8/255
if ((QUICK)); then
  RUNS=${RUNS:-runs/quick}
  read -r -a R18 <<< "${R18:---width 16 --subset 10000 --test-n 1000}"
  read -r -a SMALL <<< "${SMALL:---width 8 --subset 2000 --test-n 500}"
  R18_EPOCHS=${R18_EPOCHS:-8} LONG=${LONG:-4} SHORT=${SHORT:-2} FT_EPOCHS=2
  EVAL=(--n 500) T1_EVAL=(--n 1000) PGD_STEPS=10
  AA=(--aa-version custom --aa-attacks apgd-ce --n 100) AA_SWEEP=0,4/255,8/255
  IMNET=(--image-size 64 --subset 2000 --test-n 500 --epochs 1 --batch-size 64)
  # the stats study: 15 runs in about 100 minutes on 2 cores (measured: 223 img/s for a two-branch step)
  read -r -a STATS <<< "${STATS:---width 16 --subset 8000 --test-n 1000}"
  STATS_EPOCHS=${STATS_EPOCHS:-8} RECAL=2000
  # regime: BN fits a 500-image balanced subset (>= 99% training accuracy) in REGIME_EPOCHS, batch 64 (measured
  # first: results/regime-cpu/STUDY.md, calibration; 4,000 images fit in 100 epochs but cost 8x more per run)
  read -r -a REGIME <<< "${REGIME:---width 16 --subset 500 --test-n 1000 --batch-size 64}"
  REGIME_EPOCHS=${REGIME_EPOCHS:-200}
else
  RUNS=${RUNS:-runs/full}
  R18=() SMALL=() R18_EPOCHS=100 LONG=100 SHORT=20 FT_EPOCHS=5
  EVAL=() T1_EVAL=() PGD_STEPS=100
  AA=(--aa-version standard --n 1000) AA_SWEEP=$SWEEP
  IMNET=(--epochs 105 --batch-size 256)
  STATS=() STATS_EPOCHS=100 RECAL=10000
  # regime on one GPU (issue 31): the CPU preset's design at width 64 on 2,000 class-balanced images (batch 128, the
  # paper's), E = 60, its 27 runs side by side (JOBS at once; eager, since compiling 27 short runs would cost more than
  # it saves) and the compute-matched BN given RobMask's counted FLOPs (wall time means nothing for runs that share a
  # GPU). Estimated: `--dry-run`. Sized for one command of at most 9 minutes on an H200, not yet measured on one.
  read -r -a REGIME <<< "${REGIME:---width 64 --subset 2000 --test-n 1000}"
  REGIME_EPOCHS=${REGIME_EPOCHS:-60} JOBS=${JOBS:-9}
fi
JOBS=${JOBS:-1} REGIME_SEEDS=${REGIME_SEEDS:-0,1,2}
[[ $REGIME_SEEDS =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "run_all.sh: REGIME_SEEDS must be a comma list of seeds, not '$REGIME_SEEDS'" >&2; exit 2; }
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: JOBS must be a positive integer, not '$JOBS'" >&2; exit 2; }
FIG=$RUNS/figures
STAGE=setup

run() {  # print a command (shell-quoted: copy-paste safe), then run it (not with --dry-run); stop if it fails
  local a line="+"
  for a; do [[ $a =~ ^[][A-Za-z0-9_./:=,+@%-]+$ ]] && line+=" $a" || line+=" ${a@Q}"; done
  echo "$line"
  ((DRY)) && { echo "$line" >> "$COSTLOG"; return 0; }
  "$@" || { echo "run_all.sh: stage $STAGE failed: $*" >&2; exit 1; }
}
once() {  # once OUTPUT COMMAND...: run COMMAND unless OUTPUT exists already
  local out=$1; shift
  if [[ -e $out ]] && ((!DRY)); then echo "[skip] $out exists"; return 0; fi
  run "$@"
}
have() {  # have DIR NAME: is the dataset there? (with --dry-run, pretend it is)
  [[ $1 == synthetic || -d $1 ]] && return 0
  if ((DRY)); then echo "# ($2 not found at $1: this part would be skipped)"; return 0; fi
  local hint="set ${3:-DATA}, or mkdir it to let torchvision download it"
  [[ $2 == ImageNet ]] && hint="set IMAGENET to a folder with train/ and val/"
  echo "[$STAGE] skipping $2: no data at $1 ($hint)"
  return 1
}
# the data flags as arrays, so that a path with spaces or non-ASCII characters stays one argument
if [[ $DATA == synthetic ]]; then C10=(--dataset synthetic); else C10=(--dataset cifar10 --data-dir "$DATA"); fi
if [[ $DATA100 == synthetic ]]; then C100=(--dataset synthetic); else C100=(--dataset cifar100 --data-dir "$DATA100"); fi
train() {  # train NAME ARGS...: the run RUNS/NAME, skipped when complete and resumed when interrupted
  local name=$1; shift
  run "$PY" robmask.py train "$@" "${FAST[@]}" --out "$RUNS/$name" --resume
}
ft() {  # ft SOURCE ON PARAMS [--freeze-stats]: finetune-bn of RUNS/SOURCE-s0 into RUNS/SOURCE-ft-ON-PARAMS[-frozen]-s0
  run "$PY" robmask.py finetune-bn "$RUNS/$1-s0/checkpoint.pt" --on "$2" --params "$3" --epochs "$FT_EPOCHS" "${FAST[@]}" \
    "${@:4}" --out "$RUNS/$1-ft-$2-$3${4:+-frozen}-s0" --resume
}
ck() { echo "$RUNS/$1-s0/checkpoint.pt"; }

B=cifar10-resnet18
r18() { train "$B-$1-long-s0" --arch resnet18 "${C10[@]}" "${R18[@]}" --epochs "$R18_EPOCHS" --method "${@:2}"; }
table1_models() {
  r18 bn bn && r18 adv adv
  ft "$B-bn-long" adv affine
  for p in affine gamma beta stats; do ft "$B-adv-long" clean "$p"; done
  ft "$B-adv-long" clean gamma --freeze-stats  # γ alone, the running statistics left exactly as they were
}
stage_table1() {
  have "$DATA" CIFAR-10 || return 0
  table1_models
  for r in bn-long bn-long-ft-adv-affine adv-long adv-long-ft-clean-{affine,gamma,gamma-frozen,beta,stats}; do
    once "$RUNS/$B-$r-s0/eval.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$(ck "$B-$r")" --attack pgd --eps 0,8/255 \
      --steps "$PGD_STEPS" --mask clean "${T1_EVAL[@]}" --out "$RUNS/$B-$r-s0/eval.json"
  done
}
stage_fig1() {
  have "$DATA" CIFAR-10 || return 0
  table1_models
  once "$FIG/fig1-bn-params.png" "$PY" robmask.py plot bn-params "$(ck "$B-adv-long")" \
    "$(ck "$B-adv-long-ft-clean-affine")" --layer 1 --out "$FIG/fig1-bn-params.png"
}
stage_fig4() {
  have "$DATA" CIFAR-10 || return 0
  table1_models
  once "$FIG/fig4-feature-maps.png" "$PY" robmask.py plot feature-maps "$(ck "$B-adv-long")" \
    "$(ck "$B-adv-long-ft-clean-affine")" --image 0 --out "$FIG/fig4-feature-maps.png"
}
stage_table2() {
  have "$DATA" CIFAR-10 || return 0
  table1_models
  once "$RUNS/table2-tradeoff.json" "$PY" robmask.py tradeoff "${EVAL_AMP[@]}" "$(ck "$B-adv-long")" "$(ck "$B-adv-long-ft-clean-affine")" \
    --p 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 --eps 8/255 --steps "$PGD_STEPS" "${T1_EVAL[@]}" --out "$RUNS/table2-tradeoff.json"
  once "$FIG/table2-tradeoff.png" "$PY" robmask.py plot tradeoff "$RUNS/table2-tradeoff.json" --out "$FIG/table2-tradeoff.png"
}
small() {  # small DATASET ARCH METHOD LENGTH [SEED] [EXTRA...]: the table3/7/8 model size
  local ds=$1 arch=$2 m=$3 len=$4 seed=${5:-0} epochs=$LONG
  [[ $len == short ]] && epochs=$SHORT
  local -a dargs=("${C10[@]}")
  [[ $ds == cifar100 ]] && dargs=("${C100[@]}")
  train "$ds-$arch-$m-$len-s$seed" --arch "$arch" "${dargs[@]}" "${SMALL[@]}" --epochs "$epochs" --method "$m" --seed "$seed"
}
stage_table3() {
  local ds arch len m
  for ds in cifar10 cifar100; do
    if [[ $ds == cifar10 ]]; then have "$DATA" CIFAR-10 || continue; else have "$DATA100" CIFAR-100 DATA100 || continue; fi
    for arch in preactresnet18 resnext29 densenet121; do
      for len in short long; do
        for m in bn advprop robmask; do small "$ds" "$arch" "$m" "$len"; done
      done
    done
  done
}
stage_table4() {
  have "$IMAGENET" ImageNet IMAGENET || return 0
  for m in bn advprop robmask; do
    run "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" robmask.py train --dataset imagenet \
      --data-dir "$IMAGENET" --arch resnet18 "${IMNET[@]}" "${FAST[@]}" --method "$m" --out "$RUNS/imagenet-resnet18-$m-long-s0" --resume
  done
}
table5_models() { r18 adv adv && r18 advprop advprop && r18 robmask robmask; }
stage_table5() {
  have "$DATA" CIFAR-10 || return 0
  table5_models
  for m in adv advprop robmask; do
    once "$RUNS/$B-$m-long-s0/eval-pgd.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$(ck "$B-$m-long")" --attack pgd --eps "$SWEEP" \
      --steps "$PGD_STEPS" --mask matched "${EVAL[@]}" --out "$RUNS/$B-$m-long-s0/eval-pgd.json"
  done
}
stage_table6() {
  have "$DATA" CIFAR-10 || return 0
  table5_models
  r18 robmask-eps10 robmask --eps-max 10/255
  for m in adv advprop robmask robmask-eps10; do
    once "$RUNS/$B-$m-long-s0/eval-aa.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$(ck "$B-$m-long")" --attack autoattack \
      --eps "$AA_SWEEP" "${AA[@]}" --mask matched --out "$RUNS/$B-$m-long-s0/eval-aa.json"
  done
}
densenet_models() { for m in "$@"; do small cifar10 densenet121 "$m" long; done; }
stage_table7() { have "$DATA" CIFAR-10 || return 0; densenet_models advprop advprop-random advprop-multi robmask; }
stage_table8() {
  have "$DATA" CIFAR-10 || return 0
  for seed in 0 1 2; do small cifar10 preactresnet18 robmask long "$seed"; done
}
stage_fig3() {
  have "$DATA" CIFAR-10 || return 0
  densenet_models advprop robmask
  once "$FIG/fig3-curves.png" "$PY" robmask.py plot curves "$RUNS/cifar10-densenet121-advprop-long-s0" \
    "$RUNS/cifar10-densenet121-robmask-long-s0" --out "$FIG/fig3-curves.png"
}
stage_timing() { have "$DATA" CIFAR-10 || return 0; densenet_models advprop robmask; }  # report reads log.jsonl
stats_eval() {  # stats_eval RUN SUFFIX [EXTRA...]: clean on the whole test set, PGD-20 with both masks
  local d=$RUNS/$1 sfx=$2 mask; shift 2
  once "$d/eval-clean$sfx.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$d/checkpoint.pt" --attack none --mask clean "$@" \
    --out "$d/eval-clean$sfx.json"
  for mask in clean matched; do
    once "$d/eval-pgd20-$mask$sfx.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$d/checkpoint.pt" --attack pgd --eps 8/255 --steps 20 \
      --n 1000 --mask "$mask" "$@" --out "$d/eval-pgd20-$mask$sfx.json"
  done
}
stage_stats() {  # seed-major, so that an interrupted study has whole seeds
  have "$DATA" CIFAR-10 || return 0
  local seed v name
  for seed in 0 1 2; do
    for v in bn:bn:mixed advprop:advprop:mixed robmask-mixed:robmask:mixed robmask-split:robmask:split \
             robmask-shared:robmask:shared; do
      IFS=: read -r v m mode <<< "$v"
      name=cifar10-preactresnet18-stats-$v-s$seed
      train "$name" --arch preactresnet18 "${C10[@]}" "${STATS[@]}" --epochs "$STATS_EPOCHS" --method "$m" \
        --bn-stats "$mode" --seed "$seed"
      stats_eval "$name" ""
      [[ $v == robmask-mixed ]] && stats_eval "$name" -recal --recalibrate "$RECAL"
    done
  done
  once "$FIG/stats-curves.png" "$PY" robmask.py plot curves "$RUNS"/cifar10-preactresnet18-stats-{bn,advprop,robmask-mixed,robmask-split,robmask-shared}-s0 \
    --out "$FIG/stats-curves.png"
}
matched_flops() {  # matched_flops STEPS,STEPS...: per PGD step count, BN's epochs for RobMask's counted training FLOPs
  "$PY" -c 'import sys, torch, robmask as r
a = r.make_parser().parse_args(["train", "--arch", "preactresnet18", *sys.argv[3:]])
t, at = r.piece_flops(r.build_model(a.arch, 10, 2, a.width), torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
print(*(max(1, round(int(sys.argv[1]) * r.method_flops("robmask", t, at, int(s)) / r.method_flops("bn", t, at)))
        for s in sys.argv[2].split(",")))' "$REGIME_EPOCHS" "$1" "${REGIME[@]}"
}
matched_epochs() {  # matched_epochs BN_RUN OTHER_RUN: BN's epochs for OTHER's training wall time (from the logs)
  ((DRY)) && { echo "$((REGIME_EPOCHS * 8))"; return 0; }  # a placeholder: the real number needs the two logs
  # median seconds per epoch: robust to an epoch slowed by other work on the machine (or a paused job)
  "$PY" -c 'import json, statistics, sys
sec = [statistics.median(json.loads(l)["seconds"] for l in open(f"{d}/log.jsonl")) for d in sys.argv[1:3]]
print(max(1, round(int(sys.argv[3]) * sec[1] / sec[0])))' "$RUNS/$1" "$RUNS/$2" "$REGIME_EPOCHS"
}
regime_eval() {  # regime_eval RUN EPS TAG: clean at u(0) on the whole test set, PGD-20 at EPS, matched mask
  local d=$RUNS/$1
  once "$d/eval-clean.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$d/checkpoint.pt" --attack none --mask clean --out "$d/eval-clean.json"
  once "$d/eval-pgd20-$3.json" "$PY" robmask.py eval "${EVAL_AMP[@]}" "$d/checkpoint.pt" --attack pgd --eps "$2" --steps 20 --n 1000 \
    --mask matched --out "$d/eval-pgd20-$3.json"
}
regime_run() {  # regime_run NAME EPS TAG ARGS...: train and evaluate, unless its evaluations exist (restored from results/)
  local name=$1 eps=$2 tag=$3; shift 3
  [[ -e $RUNS/$name/eval-clean.json && -e $RUNS/$name/eval-pgd20-$tag.json ]] && ((!DRY)) && { echo "[skip] $name is evaluated"; return 0; }
  train "$name" "$@" && regime_eval "$name" "$eps" "$tag"
}
regime_bn() {  # regime_bn NAME ARGS...: the one BN run of a seed, evaluated in both arms
  local name=$1; shift
  [[ -e $RUNS/$name/eval-pgd20-eps2.json ]] && ((!DRY)) || train "$name" "$@"
  regime_eval "$name" 8/255 eps8 && regime_eval "$name" 2/255 eps2
}
cell() {  # cell NAME COMMAND...: run it; with JOBS > 1 in the background, at most JOBS at once, its output in
  local name=$1; shift  # RUNS/logs/NAME.log (several runs share one GPU: each leaves gaps that the others fill)
  if ((JOBS == 1 || DRY)); then "$@"; return; fi
  while jobs > /dev/null; (($(jobs -pr | wc -l) >= JOBS)); do wait -n || true; done  # (`jobs`: reap finished ones)
  mkdir -p "$RUNS/logs" && rm -f "$RUNS/logs/$name.failed"
  echo "[start] $name (log: $RUNS/logs/$name.log)"
  { ( "$@" ) > "$RUNS/logs/$name.log" 2>&1 && echo "[done] $name" ||
      { : > "$RUNS/logs/$name.failed"; echo "[FAILED] $name: see $RUNS/logs/$name.log"; }; } &
}
cells_done() {  # wait for every cell; stop (naming their logs) if any failed
  ((JOBS == 1 || DRY)) && return 0
  wait
  trap - EXIT INT TERM
  local failed=("$RUNS"/logs/*.failed)
  [[ -e ${failed[0]} ]] && { echo "run_all.sh: stage $STAGE failed: ${#failed[@]} run(s), see ${failed[*]/%.failed/.log}" >&2; exit 1; }
  return 0
}
stop_tree() {  # stop_tree PID: SIGTERM to PID's processes, children first (a training keeps its last checkpoint)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do stop_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}
regime_cells() {  # regime_cells main|extra SEED...: the decisive cells at E, or RobMask at E/5 and the matched BN
  local seed arm eps steps tag m e
  for seed in "${@:2}"; do
    [[ $1 == main ]] && cell "$r-bn-e$REGIME_EPOCHS-s$seed" regime_bn "$r-bn-e$REGIME_EPOCHS-s$seed" "${base[@]}" \
      --seed "$seed" --epochs "$REGIME_EPOCHS" --method bn
    for arm in $arms; do
      IFS=: read -r tag eps steps <<< "$arm"
      if [[ $1 == main ]]; then
        for m in advprop robmask; do
          cell "$r-$m-$tag-e$REGIME_EPOCHS-s$seed" regime_run "$r-$m-$tag-e$REGIME_EPOCHS-s$seed" "$eps" "$tag" "${base[@]}" \
            --seed "$seed" --epochs "$REGIME_EPOCHS" --method "$m" --eps-max "$eps" --attack-steps "$steps"
        done
        continue
      fi
      e=$((REGIME_EPOCHS / 5))
      cell "$r-robmask-$tag-e$e-s$seed" regime_run "$r-robmask-$tag-e$e-s$seed" "$eps" "$tag" "${base[@]}" --seed "$seed" \
        --epochs "$e" --method robmask --eps-max "$eps" --attack-steps "$steps"
      if ((JOBS > 1)); then e=${flops[$([[ $tag == eps8 ]] && echo 0 || echo 1)]}
      else e=$(matched_epochs "$r-bn-e$REGIME_EPOCHS-s0" "$r-robmask-$tag-e$REGIME_EPOCHS-s0"); fi
      cell "$r-bn-$tag-matched-s$seed" regime_run "$r-bn-$tag-matched-s$seed" "$eps" "$tag" "${base[@]}" --seed "$seed" \
        --epochs "$e" --method bn
    done
  done
}
stage_regime() {  # one at a time: the decisive cells first (bn, advprop, robmask at E), then E/5 and the compute-matched
  have "$DATA" CIFAR-10 || return 0  # BN, seed-major. JOBS > 1: side by side, the long matched BN runs started first
  local m r=cifar10-preactresnet18-regime FAST=("${FAST[@]}") flops=() seeds=(${REGIME_SEEDS//,/ })
  local arms="eps8:8/255:7 eps2:2/255:2" base=(--arch preactresnet18 "${C10[@]}" "${REGIME[@]}")
  if ((JOBS == 1)); then regime_cells main "${seeds[@]}"; regime_cells extra "${seeds[@]}"
  else  # the matched BN by counted FLOPs (wall time means little for runs that share a GPU), eager unless FAST is set
    read -r -a flops <<< "$(matched_flops 7,2)"  # (eps8's and eps2's PGD steps, in the order of $arms)
    ((${#flops[@]} == 2)) || { echo "run_all.sh: stage $STAGE failed: could not count the FLOPs for the matched BN" >&2; exit 1; }
    [[ -n $FAST_SET ]] || { FAST=(); for m in $DEFAULT_FAST; do [[ $m == --compile ]] || FAST+=("$m"); done; }
    ((DRY)) || trap 'for m in $(jobs -p); do stop_tree "$m"; done' EXIT  # an error or Ctrl-C stops the runs too
    ((DRY)) || trap 'exit 130' INT TERM
    regime_cells extra "${seeds[@]}"; regime_cells main "${seeds[@]}"  # (27 short runs would compile longer than it saves)
    cells_done
  fi
  local runs=() d  # the figure: test and training accuracy per epoch, one line per cell at E, its mean over the seeds
  for d in bn advprop-eps8 robmask-eps8 advprop-eps2 robmask-eps2; do
    for m in "${seeds[@]}"; do  # the runs that ran all E epochs
      [[ -e $RUNS/$r-$d-e$REGIME_EPOCHS-s$m/log.jsonl && $(wc -l < "$RUNS/$r-$d-e$REGIME_EPOCHS-s$m/log.jsonl") -eq $REGIME_EPOCHS ]] ||
        ((DRY)) && runs+=("$RUNS/$r-$d-e$REGIME_EPOCHS-s$m")
    done
  done
  if ((${#runs[@]})); then run "$PY" robmask.py plot curves "${runs[@]}" --out "$FIG/regime-curves.png"; fi  # redrawn as seeds land
}

start=$(date +%s)
echo "run_all.sh: $( ((QUICK)) && echo quick || echo full ) scale, RUNS=$RUNS, DATA=$DATA, DATA100=$DATA100, IMAGENET=$IMAGENET, NPROC=$NPROC"
((DRY)) || mkdir -p "$RUNS" "$FIG"  # a dry run creates nothing
((DRY)) && { COSTLOG=$(mktemp); trap 'rm -f "$COSTLOG"' EXIT; }
for STAGE in $ALL; do
  [[ -z $ONLY || ",$ONLY," == *",$STAGE,"* ]] || continue
  echo "== stage $STAGE"
  ((DRY)) && echo "== stage $STAGE" >> "$COSTLOG"
  t0=$(date +%s)
  "stage_$STAGE"
  ((DRY)) || echo "[$STAGE] done in $(($(date +%s) - t0)) s"
done
STAGE=report
echo "== report"
run "$PY" robmask.py report "$RUNS"
if ((DRY)); then  # what the stages above would cost, from FLOPs counted on their models (robmask.py cost)
  "$PY" robmask.py cost "$COSTLOG" 2>&1 | sed 's/^/# /'
fi
((DRY)) || echo "run_all.sh: finished in $(($(date +%s) - start)) s"
