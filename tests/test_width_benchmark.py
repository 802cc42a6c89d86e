"""benchmarks/diffrec_width_gpu.sh end to end on the tiny dataset (CPU, width 8, 2 epochs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "diffrec_width_gpu.sh"


def run_script(dataset: Path, root: Path, long_sasrec: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATASET": str(dataset), "PYTHON": sys.executable,
           "DIFFREC_RUNS": "w8:8:1e-3", "LONG_SASREC": long_sasrec,
           "EXTRA": "--epochs 2 --num-heads 1 --max-len 10 --num-workers 0"}
    done = subprocess.run(["bash", str(SCRIPT), str(root)], env=env, cwd=SCRIPT.parents[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_the_width_benchmark_trains_every_run_and_summarises_it(tiny_dataset_dir, tmp_path):
    root = tmp_path / "runs"
    done = run_script(tiny_dataset_dir, root, long_sasrec="8")
    name = tiny_dataset_dir.name
    diffrec = root / "diffrec-w8" / name / "diffrec-every-position"
    for run in (root / "sasrec-d8" / name, root / "sasrec-long-d8" / name, diffrec):
        assert json.loads((run / "metrics.json").read_text())["test"]["ndcg@10"] >= 0
    # DiffRec's items came from the stage-1 SASRec of its width, as the script says.
    model = json.loads((diffrec / "config.json").read_text())["model"]
    assert model["backbone_config"]["hidden_size"] == 8
    assert Path(model["item_init"]["checkpoint"]).parent == root / "sasrec-d8" / name
    summary = (root / "diffrec-w8" / "results.md").read_text()
    assert "## DiffRec inference trade-off" in summary and "## Targets" in summary
    assert "SASRec d=8, early stopping alone" in done.stdout
    assert "== done" in done.stdout


@pytest.mark.slow
def test_an_empty_long_sasrec_list_trains_no_long_sasrec(tiny_dataset_dir, tmp_path):
    root = tmp_path / "runs"
    done = run_script(tiny_dataset_dir, root, long_sasrec="")
    assert not list(root.glob("sasrec-long-*"))
    assert (root / "diffrec-w8" / "results.md").is_file()
    assert "early stopping alone" not in done.stdout
