#!/usr/bin/env bash
# The scaling study's GPU end (benchmarks/scaling.py; issue 22 item 6) within one lease of
# the device tool's GPU machine: ML-1M at 10/30/100% of its users and a 1M-interaction
# synthetic log at width 64, depth 2; widths 64-512 (depth 2) and depths 1-8 (width 64) on
# all of ML-1M; each fine-tuned on ML-100k from scratch, progressively and with the adapter.
#
#   bash benchmarks/scaling_gpu.sh [OUTPUT_ROOT]        # default runs/scaling/gpu
#
# The machine lacks `datasets` and `lmdb` and the prepared datasets; here first
#   MINILM=0 bash benchmarks/gpu_bundle.sh - ml-1m ml-100k      # .gpu/part1, 15 MB
# then one call of the device tool:
#   run(carry=[".gpu/part1"], timeout_s=540, command="python3 -m pip install -q --no-index
#       --no-deps --no-compile --target /tmp/site .gpu/part1/wheels/*.whl && export
#       PYTHONPATH=/tmp/site:$PWD PEFTREC_CACHE=$PWD/.gpu/part1/cache COPY_TO=$OUT && bash
#       benchmarks/scaling_gpu.sh")
#
# Budget (10 minutes of device time in all, every start and transfer counted): the start
# ~1.5-2 min and the carry and install ~20 s leave this script <= 420 s: DEADLINE 300 s for
# the study (JOBS runs at once on the one GPU, THREADS CPU threads each), then the runs the
# deadline stopped are finished where they stand (gpu_common.sh: `--resume --epochs E`, the
# best checkpoint evaluated; ~30 s), then the summary (~40 s: each pretrained model loaded
# once for its parameter split) and the copy to COPY_TO. 10 pretrainings and 27 fine-tunings
# at 10 epochs, each a process: ML-1M is 48 steps an epoch at batch 128, ML-100k 8, so a run
# is bound by its start (~10 s) and its evaluations, ~6 waves of JOBS=8 runs in ~300 s. A
# fine-tuning whose pretraining the deadline stopped does not run; its point is left out of
# the table. Rerunning on the same OUTPUT_ROOT skips finished runs, so a second lease
# continues; the 10M-interaction log (DATA="synthetic:10000000", ~200k users) needs one of
# its own.
#
# Environment: DATA (default "ml-1m:0.1 ml-1m:0.3 ml-1m:1 synthetic:1000000"); BASE_DATA
# (the model axis's, ml-1m:1); WIDTHS ("64 128 256 512"); DEPTHS ("1 2 4 8"); MODEL_GRID
# (cross: each width at depth 2, each depth at width 64; product: every pair);
# PRETRAIN_EPOCHS, FINETUNE_EPOCHS (10); EXTRA (flags for every run, e.g. "--max-steps 3"
# for a rehearsal); SEEDS (0);
# JOBS (8); THREADS (2); DEADLINE (300 s; 0: none); RESULTS (benchmarks/results/ name,
# default scaling/gpu); COPY_TO (a folder for the results files and a tarball of the runs'
# logs, e.g. $OUT); PYTHON (python3).
set -u
ROOT=${1:-runs/scaling/gpu}
DATA=${DATA:-"ml-1m:0.1 ml-1m:0.3 ml-1m:1 synthetic:1000000"}
BASE_DATA=${BASE_DATA:-ml-1m:1}
WIDTHS=${WIDTHS:-"64 128 256 512"}
DEPTHS=${DEPTHS:-"1 2 4 8"}
MODEL_GRID=${MODEL_GRID:-cross}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-10}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-10}
EXTRA=${EXTRA:-}
SEEDS=${SEEDS:-0}
JOBS=${JOBS:-8}
DEADLINE=${DEADLINE:-300}
RESULTS=${RESULTS:-scaling/gpu}
COPY_TO=${COPY_TO:-}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${THREADS:-2} HF_HUB_OFFLINE=1
START=$SECONDS
# epochs_done, finish_stopped_runs
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

# shellcheck disable=SC2206  # the lists split on spaces
study=(benchmarks/scaling.py --data $DATA --widths $WIDTHS --depths $DEPTHS
       --base-data "$BASE_DATA" --base-width 64 --base-depth 2 --model-grid "$MODEL_GRID"
       --pretrain-epochs "$PRETRAIN_EPOCHS" --finetune-epochs "$FINETUNE_EPOCHS"
       --seeds $SEEDS --output-dir "$ROOT")
# shellcheck disable=SC2206
extra=(-- $EXTRA)  # last on every call: what follows `--` goes to the runs
# Every run's command line (pretraining first), and its folder, for finish_stopped_runs.
mapfile -t commands < <($PY "${study[@]}" --dry-run "${extra[@]}" | grep -v '^#')
dirs=()
for command in "${commands[@]}"; do
  dirs+=("$(sed -E 's/.* --output-dir ([^ ]+) .*/\1/' <<< "$command")")
done
echo "== ${#commands[@]} runs, $JOBS at once, deadline $DEADLINE s"
if [ "$DEADLINE" -gt 0 ]; then
  # timeout stops the whole process group: the study and the runs it started.
  timeout --kill-after=10 "$DEADLINE" $PY "${study[@]}" --jobs "$JOBS" "${extra[@]}"
else
  $PY "${study[@]}" --jobs "$JOBS" "${extra[@]}"
fi
train() {  # run I of the study's commands, with more flags after its own
  local i=$1
  shift
  eval "${commands[$i]} $*" >> "${dirs[$i]}.log" 2>&1
}
finish_stopped_runs train
echo "== summary ($((SECONDS - START)) s)"
$PY "${study[@]}" --summary-only --results "$RESULTS" \
  --note "GPU end: the runs that finished within DEADLINE=$DEADLINE s of one device lease." \
  "${extra[@]}"
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO"
  cp benchmarks/results/"$RESULTS".* "$COPY_TO"/ 2>/dev/null
  find "$ROOT" \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \) -print0 \
    | tar --null -czf "$COPY_TO/scaling-runs.tar.gz" -T -
fi
echo "== done ($((SECONDS - START)) s)"
