#!/usr/bin/env bash
# The GPU session behind docs/RESULTS.md, in stages that each fit one 10-minute device command.
#   bash benchmarks/h100_session.sh throughput       # throughput tables (eager, compiled subset), ~6 min
#   bash benchmarks/h100_session.sh teachers         # CIFAR-10 and CIFAR-10-LT teachers, in parallel
#   bash benchmarks/h100_session.sh students c10 E   # the accuracy protocol on CIFAR-10, E epochs per student
#   bash benchmarks/h100_session.sh students lt E    # the same on CIFAR-10-LT (imbalance ratio 100)
# Needs .devdata/cifar10_canonical_order_jpeg.npz (a copy of ../shared/data/cifar10-jpeg/...), results in $OUT
# (default ./output/h100). A stage whose inputs are missing (fresh machine) rebuilds them first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-output/h100}
mkdir -p "$OUT"
DATA=${DATA:-/tmp/c10}
JOBS=${JOBS:-4}
TEACHER_EPOCHS_C10=${TEACHER_EPOCHS_C10:-20}
TEACHER_EPOCHS_LT=${TEACHER_EPOCHS_LT:-50}
STAGE_LIMIT=${STAGE_LIMIT:-540}   # seconds for a stage's training runs; finished runs are reported after it

# CIFAR recipe of hparams/ (mdistiller-like augmentation), bf16 + channels_last, batch 128, lr 0.1, cosine
TRAIN_ARGS="--amp --amp-dtype bfloat16 --channels-last --workers 3 --pin-mem --opt momentum --momentum 0.9 \
--weight-decay 5e-4 --sched cosine --warmup-epochs 0 --cooldown-epochs 0 --scale 0.75 1.0 --ratio 0.9 1.1 \
--hflip 0.5 --color-jitter 0 --smoothing 0 --train-interpolation bilinear --crop-pct 1.0 \
--mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 --log-interval 100000 --checkpoint-hist 1"
# every distillation variant: the paper's 0.1 CE + 0.9 KD, T = 4; DKD warm-up scaled to the short schedule
DISTILL_ARGS="--task-loss-weight 0.1 --distill-loss-weight 0.9 --kd-temperature 4 --dkd-warmup 1"
PEERS="kd_ls energy_kd_ls dkd_ls wttm r2kd rekd cskd"

NPZ=.devdata/cifar10_canonical_order_jpeg.npz
[ -f $NPZ ] || NPZ=../shared/data/cifar10-jpeg/cifar10_canonical_order_jpeg.npz
prepare() {
  [ -f $DATA/.done ] || { python benchmarks/prepare_cifar10.py --npz $NPZ --out $DATA ${PER_CLASS:+--per-class $PER_CLASS} \
    && touch $DATA/.done; }
}

acc() {  # acc SET EPOCHS [extra accuracy.py args...]
  local set=$1 epochs=$2; shift 2
  local extra=(--num-classes 10 --batch-size 128 --lr 0.1 --seeds 0 1 2 --jobs "$JOBS"
               --train-args "$TRAIN_ARGS" --distill-args "$DISTILL_ARGS" --extra-losses $PEERS)
  if [ "$set" = lt ]; then
    extra+=(--imbalance-factor 0.01 --teacher-epochs "$TEACHER_EPOCHS_LT")
  else
    extra+=(--teacher-epochs "$TEACHER_EPOCHS_C10")
  fi
  ${LIMIT:+timeout $LIMIT} python benchmarks/accuracy.py --data-dir $DATA --output /tmp/acc-$set --epochs "$epochs" "${extra[@]}" "$@"
}

case "${1:-}" in
  throughput)
    prepare > "$OUT/prepare.log" 2>&1 &
    python benchmarks/throughput.py --setting cifar --json "$OUT/tp-cifar.json" --png "$OUT/tp-cifar.png" \
      2>&1 | tee "$OUT/throughput.log"
    python benchmarks/throughput.py --setting imagenet --warmup 5 --iters 10 --reps 3 \
      --json "$OUT/tp-imagenet.json" --png "$OUT/tp-imagenet.png" 2>&1 | tee -a "$OUT/throughput.log"
    timeout 170 python benchmarks/throughput.py --setting cifar --compile --warmup 10 --iters 20 --reps 3 \
      --variants ce timm_kd kd energy_kd energy_dkd he_da_r0.3 --json "$OUT/tp-cifar-compile.json" \
      2>&1 | tee -a "$OUT/throughput.log"
    wait
    ;;
  teachers)
    prepare
    # the teacher command accuracy.py would run (first line of its dry run), both sets at once
    for set in c10 lt; do
      acc $set 1 --dry-run > /tmp/dry-$set.txt; echo "$(head -1 /tmp/dry-$set.txt) --workers 7" > /tmp/teacher-$set.sh
      (timeout "$STAGE_LIMIT" bash /tmp/teacher-$set.sh > "$OUT/teacher-$set.log" 2>&1) &
    done
    wait
    for set in c10 lt; do tail -3 /tmp/acc-$set/runs/teacher-s0/summary.csv; done | tee "$OUT/teachers.txt"
    ;;
  students)
    set=${2:?students c10|lt EPOCHS}; epochs=${3:?students c10|lt EPOCHS}; shift 3
    prepare
    LIMIT=$STAGE_LIMIT acc $set "$epochs" "$@" > "$OUT/students-$set.log" 2>&1
    pkill -f train_energykd.py; sleep 1
    acc $set "$epochs" "$@" --report-only > "$OUT/report-$set.log" 2>&1
    cp /tmp/acc-$set/results.md "$OUT/results-$set.md"; cp /tmp/acc-$set/results.json "$OUT/results-$set.json"
    cp /tmp/acc-$set/accuracy.png "$OUT/accuracy-$set.png"
    tar czf "$OUT/runs-$set.tgz" -C /tmp/acc-$set logs $(cd /tmp/acc-$set && ls -d runs/*/summary.csv runs/*/args.yaml \
      runs/*/energy_thresholds.json 2>/dev/null)
    ;;
  *) echo "usage: $0 throughput | teachers | students c10|lt EPOCHS" >&2; exit 2 ;;
esac
