#!/usr/bin/env bash
# DiffRec at the paper's width (d=256) next to SASRec at the same widths, on one GPU.
#
#   bash benchmarks/diffrec_width_gpu.sh [OUTPUT_ROOT]        # default runs/gpu-width
#
# Stage 1 trains a SASRec at each width: the SASRec command of docs/results-history.md (28 epochs) with the
# width changed (ffn = 4 d); its items start the DiffRec of that width. Stage 2 trains, all
# at once on the one GPU:
#   - the batch-128 DiffRec recipe (docs/results-history.md, "Batch 128, the planned schedule halved") at
#     each width and rate of DIFFREC_RUNS, its item table copied from stage 1's SASRec;
#   - SASRec at each width of LONG_SASREC without the 28-epoch cap (early stopping alone,
#     up to 200 epochs): the reference trained to convergence.
# A stage-2 run still training DEADLINE seconds after the start of this script is stopped
# and finished where it stands (`--resume --epochs E`, E its completed epochs, evaluates
# its best checkpoint on the test split; DiffRec's step schedule depends only on the step
# count, so a stopped run is the same recipe cut short). Last, the benchmarks summarise
# every run one after the other, the GPU otherwise idle: test metrics, seconds per epoch,
# and for DiffRec the inference cost against stage 1's SASRec and the trade-off table.
#
# Environment: DATASET (default ml-1m); DEADLINE (seconds, default none); EXTRA (more flags
# for every run, e.g. "--epochs 2" for a smoke run); DIFFREC_RUNS (NAME:WIDTH:LR, default
# "d128:128:2e-3 d256:256:2e-3 d256-lr1e-3:256:1e-3"); LONG_SASREC (widths, default
# "64 256", empty for none); PYTHON (default python3).
set -u
ROOT=${1:-runs/gpu-width}
DATASET=${DATASET:-ml-1m}
DEADLINE=${DEADLINE:-0}
EXTRA=${EXTRA:-}
DIFFREC_RUNS=${DIFFREC_RUNS:-"d128:128:2e-3 d256:256:2e-3 d256-lr1e-3:256:1e-3"}
LONG_SASREC=${LONG_SASREC-"64 256"}  # set but empty: none
PY=${PYTHON:-python3}
START=$SECONDS
# epochs_done, last_epoch, wait_for_runs, finish_stopped_runs
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
NAME=$(basename "$DATASET")

width_flags() { echo "--hidden-size $1 --ffn-size $(($1 * 4))"; }
SASREC="--repeat-bias --lr 2e-3 --patience 8 --report-to none"
# The batch-128 recipe; diffrec_movielens.py adds BACKBONE itself.
BACKBONE="--backbone diffrec --preset none --causal-denoiser --every-position"
RECIPE="--report-to none --max-len 50 --train-windows all --dropout 0.2 --batch-size 128
  --patience 10 --repeat-bias --untied-output --scheduler step --decay-epochs 23 28
  --decay-factor 0.25 --freeze-items-epochs 31 --epochs 78 --num-workers 2
  --eval-batch-size 1024"

diffrec_dir() { echo "$ROOT/diffrec-$1/$NAME/diffrec-every-position"; }
diffrec_flags() {  # NAME:WIDTH:LR -> the training flags of that run
  local name w lr
  IFS=: read -r name w lr <<< "$1"
  echo "$RECIPE $(width_flags "$w") --lr $lr --init-items-from $ROOT/sasrec-d$w/$NAME"
}
widths=$(for run in $DIFFREC_RUNS; do echo "$run" | cut -d: -f2; done | sort -un)
echo "== stage 1: SASRec at d = $(echo $widths) ($((SECONDS - START)) s)"
for w in $widths; do
  mkdir -p "$ROOT/sasrec-d$w"
  $PY benchmarks/sasrec_movielens.py --datasets "$DATASET" --output-dir "$ROOT/sasrec-d$w" -- \
    $SASREC --epochs 28 $(width_flags "$w") $EXTRA > "$ROOT/sasrec-d$w/train.log" 2>&1 &
done
wait
for w in $widths; do
  echo "-- SASRec d=$w, 28 epochs"
  cat "$ROOT/sasrec-d$w/results.md" 2>/dev/null || tail -n 20 "$ROOT/sasrec-d$w/train.log"
done

# Stage 2: each run is a folder and its pretrain_id.py flags (kept to finish it if stopped).
dirs=() flags=()
for run in $DIFFREC_RUNS; do
  dirs+=("$(diffrec_dir "${run%%:*}")") flags+=("$BACKBONE $(diffrec_flags "$run")")
done
for w in $LONG_SASREC; do
  dirs+=("$ROOT/sasrec-long-d$w/$NAME") flags+=("$SASREC --epochs 200 $(width_flags "$w")")
done
train_stage2() {  # run I of stage 2, with more flags after its own
  local i=$1
  shift
  $PY scripts/pretrain_id.py --dataset "$DATASET" --output-dir "${dirs[$i]}" ${flags[$i]} \
    $EXTRA "$@" >> "${dirs[$i]}/train.log" 2>&1
}
echo "== stage 2: ${dirs[*]} ($((SECONDS - START)) s)"
for i in "${!dirs[@]}"; do
  mkdir -p "${dirs[$i]}"
  train_stage2 "$i" &
done
wait_for_runs
finish_stopped_runs train_stage2

echo "== summaries ($((SECONDS - START)) s)"
for w in $LONG_SASREC; do
  dir="$ROOT/sasrec-long-d$w"
  echo "-- SASRec d=$w, early stopping alone"
  $PY benchmarks/sasrec_movielens.py --datasets "$DATASET" --output-dir "$dir" -- $SASREC \
    --epochs "$(epochs_done "$dir/$NAME")" $(width_flags "$w") $EXTRA > "$dir/summary.log" 2>&1
  cat "$dir/results.md" 2>/dev/null || tail -n 20 "$dir/summary.log"
done
for run in $DIFFREC_RUNS; do
  name=${run%%:*}
  w=$(echo "$run" | cut -d: -f2)
  echo "-- DiffRec $run"
  $PY benchmarks/diffrec_movielens.py --datasets "$DATASET" --models "diffrec every position" \
    --sasrec-runs "$NAME=$ROOT/sasrec-d$w/$NAME" --output-dir "$ROOT/diffrec-$name" -- \
    $(diffrec_flags "$run") $EXTRA --epochs "$(epochs_done "$(diffrec_dir "$name")")" \
    > "$ROOT/diffrec-$name/summary.log" 2>&1
  cat "$ROOT/diffrec-$name/results.md" 2>/dev/null || tail -n 20 "$ROOT/diffrec-$name/summary.log"
done
echo "== done ($((SECONDS - START)) s)"
