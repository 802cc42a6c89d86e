#!/usr/bin/env bash
# The distributed paths run for real on one GPU (issue 23 item 6): short pretraining runs of
# an ID SASRec on DATASET, each launched by `accelerate launch` with a shipped config,
#   single_gpu  scripts/accelerate_configs/single_gpu.yaml in fp32 (--mixed_precision no);
#   fsdp        scripts/accelerate_configs/fsdp.yaml with one process, fp32 (FSDP2: the
#               validation runs on parameters gathered by pretraining.evaluation.unsharded);
#   bf16        single_gpu.yaml as shipped (bf16 autocast in training);
# STEPS optimizer steps each (--max-steps, validation after every epoch), then each run's
# best checkpoint is re-evaluated by a plain one-process `scripts/evaluate.py` (no launcher,
# fp32) and the test and validation metrics must equal those the run wrote to metrics.json
# (to TOLERANCE). Prints one line per run and exits 1 if any differs or failed.
#
#   bash benchmarks/distributed_gpu.sh [OUTPUT_ROOT]     # default runs/gpu-distributed
#
# On the device tool's GPU machine: `bash benchmarks/gpu_bundle.sh ANY_RUN ml-1m` packs the
# wheels the machine lacks and the prepared ML-1M (ANY_RUN: any run folder, it is carried
# but not used); its second `run` call then runs, instead of end_to_end_gpu.sh,
#   DATASET=ml-1m COPY_TO=$OUT bash benchmarks/distributed_gpu.sh
# Budget (<= 10 minutes of device time): the start and the carries ~2.5 min; per run ~15 s of
# imports and launch, ~300 steps of a 2-layer d=64 SASRec at batch 128 (ML-1M: 47 steps an
# epoch, ~7 epochs, each with a full-ranking validation of 6,040 users: a few seconds on an
# H200) and ~10 s of re-evaluation: about 1.5 min for the three runs.
#
# Rehearsed on CPU at a tiny size: CPU=1 (launches with --cpu) and DATASET a small folder.
# With --cpu Accelerate runs fsdp.yaml undistributed (DistributedType.NO), so the fsdp run
# is left out unless RUNS names it; tests/test_distributed.py covers FSDP's evaluation.
#
# Environment: DATASET (default ml-1m); STEPS (300); RUNS (default "single_gpu fsdp bf16";
# on CPU "single_gpu bf16"); TOLERANCE (0: exactly equal); EXTRA (more flags for every run);
# CPU (1: rehearse on CPU); COPY_TO (a folder that gets every run's metrics.json,
# evaluation.json and log.jsonl); PYTHON (default python3).
set -u
ROOT=${1:-runs/gpu-distributed}
DATASET=${DATASET:-ml-1m}
STEPS=${STEPS:-300}
CPU=${CPU:-0}
if [ "$CPU" = 1 ]; then RUNS=${RUNS:-"single_gpu bf16"}; else RUNS=${RUNS:-"single_gpu fsdp bf16"}; fi
TOLERANCE=${TOLERANCE:-0}
EXTRA=${EXTRA:-}
COPY_TO=${COPY_TO:-}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f scripts/pretrain_id.py ] || { echo "run from the repository root"; exit 2; }
CONFIGS=scripts/accelerate_configs
MODEL="--hidden-size 64 --num-layers 2 --num-heads 2 --max-len 50 --batch-size 128 \
--eval-batch-size 1024 --report-to none --patience 100 --epochs 1000 --max-steps $STEPS"
cpu_flags=() script_cpu=()
[ "$CPU" = 1 ] && cpu_flags=(--cpu) && script_cpu=(--cpu)

launch_args() {  # RUN: accelerate launch's flags for that run, then the script's precision
  # (the script's --mixed-precision wins over the launcher's: Accelerator is given it)
  case $1 in
    single_gpu) echo "--config_file $CONFIGS/single_gpu.yaml --mixed_precision no|no" ;;
    fsdp) echo "--config_file $CONFIGS/fsdp.yaml --num_processes 1 --mixed_precision no|no" ;;
    bf16) echo "--config_file $CONFIGS/single_gpu.yaml --mixed_precision bf16|bf16" ;;
    *) echo "unknown run $1 (single_gpu, fsdp, bf16)" >&2; return 2 ;;
  esac
}

mkdir -p "$ROOT"
failed=0
for run in $RUNS; do
  dir="$ROOT/$run"
  args=$(launch_args "$run") || exit 2
  precision=${args#*|} args=${args%|*}
  rm -rf "$dir"
  started=$SECONDS
  # shellcheck disable=SC2086  # the flag strings are split on purpose
  if ! $PY -m accelerate.commands.launch $args "${cpu_flags[@]}" scripts/pretrain_id.py \
      --dataset "$DATASET" --output-dir "$dir" $MODEL --mixed-precision "$precision" \
      "${script_cpu[@]}" $EXTRA \
      > "$dir.train.log" 2>&1; then
    echo "$run: training failed ($((SECONDS - started)) s); the end of $dir.train.log:"
    tail -n 15 "$dir.train.log"
    failed=1
    continue
  fi
  if ! $PY scripts/evaluate.py --run "$dir" --output "$dir/evaluation.json" \
      "${script_cpu[@]}" > "$dir.evaluate.log" 2>&1; then
    echo "$run: re-evaluation failed; the end of $dir.evaluate.log:"
    tail -n 15 "$dir.evaluate.log"
    failed=1
    continue
  fi
  $PY - "$dir" "$run" "$TOLERANCE" "$((SECONDS - started))" <<'EOF' || failed=1
import json, sys
from pathlib import Path
run_dir, name, tolerance, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
reported = json.loads((run_dir / "metrics.json").read_text())
again = json.loads((run_dir / "evaluation.json").read_text())
differences = {f"{split} {metric}": (value, again[split][metric])
               for split in ("valid", "test") for metric, value in reported[split].items()
               if abs(value - again[split][metric]) > tolerance}
training = reported["training"]
print(f"{name}: {training['epochs']} epochs, {seconds} s, test ndcg@10 "
      f"{reported['test']['ndcg@10']:.4f}, processes {reported['protocol']['num_processes']}; "
      + ("re-evaluated by evaluate.py: equal" if not differences else
         f"re-evaluated by evaluate.py: DIFFERENT {differences}"))
sys.exit(1 if differences else 0)
EOF
  if [ -n "$COPY_TO" ]; then
    mkdir -p "$COPY_TO/$run"
    cp "$dir/metrics.json" "$dir/evaluation.json" "$dir/log.jsonl" "$COPY_TO/$run/"
  fi
done
exit $failed
