# Shared by the GPU benchmark scripts (benchmarks/end_to_end_gpu.sh,
# benchmarks/diffrec_width_gpu.sh), sourced, not run: the runs that train at once on one GPU,
# the deadline that stops them, and their finishing where they stand.
#
# The sourcing script sets PY (the Python to run), START (its $SECONDS at the start),
# DEADLINE (seconds after START; 0: none) and the array dirs (the runs' folders, one per run);
# it defines the function that trains run I with more flags after its own, passed by name
# to finish_stopped_runs.

epochs_done() {  # epochs a run folder has completed (0 before its first)
  local state
  # state.old is the save before state/, which --resume falls back to (and all there is
  # after an interruption between the trainer's two renames; pretraining/trainer.py).
  for state in "$1/state/trainer_state.json" "$1/state.old/trainer_state.json"; do
    if [ -f "$state" ]; then
      $PY -c "import json, sys; print(json.load(open(sys.argv[1]))['epoch'])" "$state"
      return
    fi
  done
  echo 0
}

last_epoch() {  # a run's last epoch in one line (log.jsonl)
  [ -f "$1/log.jsonl" ] && tail -n 1 "$1/log.jsonl" | $PY -c "import json, sys
row = json.loads(sys.stdin.read())
print(f\"epoch {row['epoch']} valid ndcg@10 {row['valid']['ndcg@10']:.4f} {row['seconds']:.1f} s\")"
}

wait_for_runs() {  # until every background run ends, or DEADLINE stops those still training
  local elapsed dir
  while jobs -r | grep -q .; do
    sleep 5
    elapsed=$((SECONDS - START))
    if [ "$DEADLINE" -gt 0 ] && [ "$elapsed" -ge "$DEADLINE" ]; then
      echo "deadline: stopping the runs still training ($elapsed s)"
      kill -TERM $(jobs -pr) 2>/dev/null
      break
    fi
    if [ $((elapsed % 60)) -lt 5 ]; then  # about once a minute
      for dir in "${dirs[@]}"; do echo "$elapsed s $dir: $(last_epoch "$dir")"; done
    fi
  done
  wait
}

finish_stopped_runs() {  # TRAIN: each run without metrics.json, from its completed epochs
  local train=$1 i epochs
  echo "== finishing stopped runs ($((SECONDS - START)) s)"
  for i in "${!dirs[@]}"; do
    [ -f "${dirs[$i]}/metrics.json" ] && continue
    epochs=$(epochs_done "${dirs[$i]}")
    echo "${dirs[$i]}: stopped after epoch $epochs"
    [ "$epochs" -gt 0 ] || continue
    "$train" "$i" --resume --epochs "$epochs" &
  done
  wait
}
