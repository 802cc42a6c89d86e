"""benchmarks/diffusion_family.py at a tiny size: a row trains (its item source first), the
masked column and the timing are computed and kept, the results file is written, and a
second call summarises the finished runs without training again."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

from tests.helpers import SMALL, load_benchmark, load_script

family = load_benchmark("diffusion_family")
results_module = sys.modules["results"]  # the neighbour the driver writes its results through


@pytest.fixture
def in_process_training(monkeypatch) -> list[list[str]]:
    """The driver's training commands, run in this process (no interpreter start-up each);
    returns the list they are recorded in. Other commands (git's, for the provenance) run."""
    commands, real_run = [], subprocess.run

    def run(command, **options):
        if not str(command[1]).endswith("pretrain_id.py"):
            return real_run(command, **options)
        commands.append(command)
        load_script("pretrain_id").main(command[2:])

    monkeypatch.setattr(subprocess, "run", run)
    return commands


def test_a_row_trains_with_its_item_source_and_is_summarised_once_finished(
        tiny_dataset_dir, tmp_path, monkeypatch, in_process_training):
    results = tmp_path / "results"
    monkeypatch.setattr(results_module, "write_result",
                        functools.partial(results_module.write_result, results_dir=results))
    argv = ["--dataset", str(tiny_dataset_dir), "--seeds", "0", "--epochs", "1",
            "--timing-users", "20", "--only", "diffrec plus", "--output-dir",
            str(tmp_path / "runs"), "--results", "diffusion-family/tiny", "--",
            *SMALL, "--diffusion-steps", "10", "--num-seeds", "2"]
    family.main(argv)
    # The item source (SASRec) trained first, then DiffRec plus from its table.
    source, run = tmp_path / "runs" / "sasrec-d256" / "seed0", tmp_path / "runs" / "diffrec-plus"
    assert [command[command.index("--output-dir") + 1] for command in in_process_training] == [
        str(source), str(run / "seed0")]
    assert ["--init-items-from", str(source)] == in_process_training[1][
        in_process_training[1].index("--init-items-from"):][:2]
    saved = json.loads((results / "diffusion-family" / "tiny.json").read_text())
    (unmasked,), (masked,) = saved["rows"], saved["masked_rows"]
    assert unmasked["model"] == masked["model"] == "diffrec plus"  # the source is no row
    assert float(masked["hr@20"]) >= float(unmasked["hr@20"])  # masking only removes rivals
    assert (run / "seed0" / family.MASKED_FILE).is_file()
    assert (run / "seed0" / family.TIMING_FILE).is_file()
    markdown = (results / "diffusion-family" / "tiny.md").read_text()
    assert "History masked" in markdown and "| diffrec plus | 1 |" in markdown

    in_process_training.clear()
    family.main([*argv[:argv.index("--")], "--summary-only"])
    assert not in_process_training  # finished: nothing trains again
    assert json.loads((results / "diffusion-family" / "tiny.json").read_text())["rows"][0][
        "ndcg@10"] == unmasked["ndcg@10"]


def test_an_unknown_row_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        family.main(["--only", "diffrec best"])
    assert "--only: unknown rows ['diffrec best']" in capsys.readouterr().err
