#!/usr/bin/env bash
# The text encoder trained end to end (Adapter4Rec's question) on one GPU: a text source
# (pretrained on ML-1M, MiniLM frozen and cached) fine-tuned on ML-100k with the encoder
#   frozen  - "full fine-tuning b32": backbone and item head trained, encoder outputs cached;
#   head    - "lora item_encoder head b32": LoRA rank 32 on the item head, the cache kept;
#   top-1   - "houlsby both top:1 + projection b32": Houlsby adapters in MiniLM's top layer
#             (run inside the step above a cache of the layers below) and in the backbone's
#             top layer, the item head trained;
#   top-2   - "houlsby both top:2 + projection b32": the same in MiniLM's top 2 layers and
#             both backbone layers.
# Rows are benchmarks/transfer.py's GRID rows (ROWS), with their own flags; every run adds
# COMMON (--repeat-bias --patience 20 --mixed-precision bf16 ...: the best CPU recipe of docs/results-history.md
# for the first two rows, in bf16 for all) and EXTRA. All ROWS x SEEDS runs train at once on
# the one GPU, each a process on one CPU thread, in the run folders benchmarks/transfer.py
# uses (OUTPUT_ROOT/text/ROW/seedN), so its --summary-only writes the table and the PNG.
#
#   bash benchmarks/end_to_end_gpu.sh SOURCE_RUN [OUTPUT_ROOT]     # default runs/gpu-e2e
#
# A run still training DEADLINE seconds after the start of this script is stopped and
# finished where it stands (`--resume --epochs E`, E its completed epochs: evaluates its best
# checkpoint); a run stopped before its first epoch has nothing to finish and is left out.
# Finished runs are never trained again, so the script can be rerun on the same folder.
#
# On the device tool's GPU machine: `bash benchmarks/gpu_bundle.sh SOURCE_RUN` packs what it
# lacks (wheels, MiniLM, the prepared ML-100k, the source run) into two carries and prints
# the two `run` calls, the second of which runs this script.
#
# Budget (10 minutes of device time in all, every start and transfer counted): the machine's
# start ~1.5-2 min, the two carries (47 + 37 MB) and the wheels' install ~30 s, so this
# script gets <= 420 s: DEADLINE 270 s of training, then ~40 s to finish stopped runs (a
# process each, in parallel: imports, the model with its hidden cache, two full-ranking
# evaluations) and ~30 s of summary: ~340 s, ~490 s in all with ~110 s to spare. Epochs:
# measured on CPU (1 thread, benchmarks/results/end-to-end/step-cpu.md), a top-2 step at
# batch 32 runs ~860 items x ~14 tokens through two MiniLM layers, under 0.1 s of GPU work
# on the H200, so a step is bound by kernel launches (~14 chunks of 64 items x ~100 kernels
# forward and backward: ~20-40 ms), and an ML-100k epoch at batch 32 (30 steps + validation
# of 943 users) should take ~1-3 s with 12 runs sharing the GPU: ~90-270 epochs in 270 s.
# EPOCHS stays at the scripts' 200 and patience 20 ends most runs first (on CPU the first two
# recipes stopped after 60-130 epochs); those the deadline stops are finished from their best
# checkpoint and the log says so.
#
# Environment: TARGET (default ml-100k); SEEDS (default "0 1 2"); ROWS (GRID names joined by
# '|', default the four above); DEADLINE (seconds, default 270; 0: none); EPOCHS (200);
# PATIENCE (20); PRECISION (bf16); EXTRA (more flags for every run, e.g. "--cpu");
# RESULTS (benchmarks/results/ name, default end-to-end/ml-1m-to-ml-100k-gpu; empty: none);
# COPY_TO (a folder that gets the results files and a tarball of every run's logs, e.g. $OUT);
# THREADS (per run, default 1); PYTHON (default python3).
set -u
SOURCE=${1:?usage: bash benchmarks/end_to_end_gpu.sh SOURCE_RUN [OUTPUT_ROOT]}
ROOT=${2:-runs/gpu-e2e}
TARGET=${TARGET:-ml-100k}
SEEDS=${SEEDS:-"0 1 2"}
ROWS=${ROWS:-"full fine-tuning b32|lora item_encoder head b32|houlsby both top:1 + projection b32|houlsby both top:2 + projection b32"}
DEADLINE=${DEADLINE:-270}
EPOCHS=${EPOCHS:-200}
PATIENCE=${PATIENCE:-20}
PRECISION=${PRECISION:-bf16}
EXTRA=${EXTRA:-}
RESULTS=${RESULTS-end-to-end/ml-1m-to-ml-100k-gpu}  # set but empty: no results file
COPY_TO=${COPY_TO:-}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f benchmarks/transfer.py ] || { echo "run from the repository root"; exit 2; }
START=$SECONDS
# epochs_done, last_epoch, wait_for_runs, finish_stopped_runs
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
LABEL=text  # the source's name in the table
COMMON="--report-to none --repeat-bias --patience $PATIENCE --epochs $EPOCHS \
--mixed-precision $PRECISION --eval-batch-size 1024"  # one line: it is eval'ed

# Each row of ROWS from the grid: name, script, run folder, flags (tab-separated).
grid=$($PY - "$ROWS" <<'EOF'
import shlex, sys
sys.path.insert(0, "benchmarks")
from transfer import GRID, MATCH, run_folder
rows = {name: (script, flags) for name, script, flags, _ in GRID}
wanted = [name.strip() for name in sys.argv[1].split("|") if name.strip()]
unknown = [name for name in wanted if name not in rows or MATCH in rows[name][1]]
if unknown:
    sys.exit(f"ROWS {unknown}: not rows of benchmarks/transfer.py's GRID (or they need "
             "--match-items-by, which this script does not pass)")
for name in wanted:
    script, flags = rows[name]
    print("\t".join([name, script, run_folder(name), shlex.join(flags)]))
EOF
) || exit 2
[ -f "$SOURCE/config.json" ] || { echo "$SOURCE: not a pretraining run folder"; exit 2; }

names=() dirs=() commands=()
while IFS=$'\t' read -r name script folder flags; do
  names+=("$name")
  for seed in $SEEDS; do
    dirs+=("$ROOT/$LABEL/$folder/seed$seed")
    # As benchmarks/transfer.py's run_one: common flags first, the row's own last (they win).
    commands+=("$(printf '%q ' "scripts/$script.py" --pretrained "$SOURCE" --dataset "$TARGET" \
      --output-dir "$ROOT/$LABEL/$folder/seed$seed" --seed "$seed") $COMMON $EXTRA $flags")
  done
done <<< "$grid"

train() {  # run I, with more flags after its own
  local i=$1
  shift
  mkdir -p "${dirs[$i]}"
  # exec: the job is the training process itself, so the deadline's kill reaches it.
  eval "exec $PY ${commands[$i]} \"\$@\"" >> "${dirs[$i]}/train.log" 2>&1
}
echo "== training ${#dirs[@]} runs: ${names[*]} x seeds $SEEDS ($((SECONDS - START)) s)"
for i in "${!dirs[@]}"; do
  if [ -f "${dirs[$i]}/metrics.json" ]; then continue; fi
  resume=()
  [ -f "${dirs[$i]}/config.json" ] && resume=(--resume)
  train "$i" "${resume[@]}" &
done
wait_for_runs
finish_stopped_runs train
for dir in "${dirs[@]}"; do
  [ -f "$dir/metrics.json" ] || echo "$dir: no result (see its train.log)"
done

echo "== summary ($((SECONDS - START)) s)"
# shellcheck disable=SC2086
$PY benchmarks/transfer.py --source "$LABEL=$SOURCE" --target "$TARGET" --seeds $SEEDS \
  --only "${names[@]}" --summary-only --output-dir "$ROOT" ${RESULTS:+--results "$RESULTS"} \
  -- $COMMON $EXTRA 2>&1 | tee "$ROOT/summary.log"
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO" && dest=$(cd "$COPY_TO" && pwd)
  [ -n "$RESULTS" ] && cp benchmarks/results/"$RESULTS".{md,json,png} "$dest"/ 2>/dev/null
  (cd "$ROOT" && find . \( -name config.json -o -name metrics.json -o -name log.jsonl \
    -o -name train.log -o -name summary.log -o -name 'results.*' \) -not -path '*/best_model/*' \
    -not -path '*/state*' -print0 | tar --null -czf "$dest/runs.tar.gz" -T -) \
    || echo "could not copy the run logs to $COPY_TO"
fi
echo "== done ($((SECONDS - START)) s)"
