"""--on-nan: a NaN training loss, injected into chosen training batches, stops the run with
an error naming the step, the batch's users and the last saved state, or skips that step."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftrec.dataset_tools import load_dataset_folder
from peftrec.pretraining.cli import run_main
from peftrec.pretraining.recommender import SequentialRecommender
from peftrec.pretraining.trainer import NonFiniteLossError, TrainingConfig
from tests.helpers import SMALL, failure_report, free_port, run_pretrain

ROOT = Path(__file__).resolve().parents[1]


def inject_nan(monkeypatch, at: set[int]) -> dict:
    """Make the loss of the training batches numbered `at` (0-based, over the whole run)
    NaN; returns what the hook saw: each NaN batch's user indices, the weights before it."""
    forward = SequentialRecommender.forward
    seen = {"batches": 0, "users": [], "weights": None}

    def nan_loss(self, batch):
        out = forward(self, batch)
        if not self.training:
            return out
        index = seen["batches"]
        seen["batches"] += 1
        if index in at:
            seen["users"].extend(batch["user"].tolist())
            if seen["weights"] is None:
                seen["weights"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            out = {**out, "loss": out["loss"] * torch.tensor(float("nan"))}
        return out

    monkeypatch.setattr(SequentialRecommender, "forward", nan_loss)
    return seen


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_stop_names_the_step_the_users_and_the_last_state(tiny_dataset_dir, tmp_path,
                                                          monkeypatch, capsys):
    run = tmp_path / "run"
    # 60 users / 16 = 4 batches an epoch: batch 5 is step 6, in epoch 2.
    seen = inject_nan(monkeypatch, at={5})
    original = SequentialRecommender.forward
    files = {}

    def snapshot_then_forward(self, batch):
        if self.training and not files and seen["batches"] == 5:
            files.update(folder_bytes(run))  # the run folder as the NaN step finds it
        return original(self, batch)

    monkeypatch.setattr(SequentialRecommender, "forward", snapshot_then_forward)
    script = load_script_main()
    with pytest.raises(SystemExit) as exit_info:
        run_main(script, ["--dataset", str(tiny_dataset_dir), "--output-dir", str(run), *SMALL,
                          "--epochs", "3"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err  # progress bars, then the error
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0])
    error = errors[0]
    names = load_dataset_folder(tiny_dataset_dir).sequences["user_id"]
    users = [names[index] for index in seen["users"]]
    assert len(users) == 16
    assert "step 6 (epoch 2, batch of users " + ", ".join(users) + ")" in error
    assert f"last good checkpoint: {run / 'state'} (epoch 1, step 4; --resume" in error
    assert "--on-nan skip" in error
    assert files and folder_bytes(run) == files  # nothing written before is touched
    assert not any((run / name).exists() for name in ("state.tmp", "state.old"))


def test_stop_before_any_saved_state_says_none(tiny_dataset_dir, tmp_path, monkeypatch):
    seen = inject_nan(monkeypatch, at={1})
    with pytest.raises(NonFiniteLossError, match=r"in step 2 \(epoch 1, .*last good "
                                                 r"checkpoint: none \(no training state"):
        run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "1")
    assert seen["users"]


def test_skip_drops_the_step_counts_it_and_finishes(tiny_dataset_dir, tmp_path, monkeypatch,
                                                    caplog):
    """With --grad-accum 2 the NaN is in the first micro-batch of step 2 (batches 2 and 3),
    whose own loss the sync micro-step does not show: the whole step is skipped."""
    run = tmp_path / "run"
    seen = inject_nan(monkeypatch, at={2})
    with caplog.at_level(logging.WARNING, logger="peftrec.pretraining.trainer"):
        metrics = run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--grad-accum", "2",
                               "--on-nan", "skip")
    names = load_dataset_folder(tiny_dataset_dir).sequences["user_id"]
    users = ", ".join(names[index] for index in seen["users"])
    assert f"training loss in step 2 (epoch 1, batch of users {users}): skipped" in caplog.text
    assert metrics["training"]["skipped_steps"] == 1
    assert metrics["training"]["epochs"] == 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["skipped_steps"] for row in log] == [1, 1]
    assert [row["step"] for row in log] == [1, 3]  # steps taken: epoch 1 lost its second
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in log)
    state = json.loads((run / "state" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["global_step"] == 3
    weights = load_file(run / "state" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    best = load_file(run / "best_model" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in best.values())


def test_a_skipped_step_leaves_the_weights_as_they_were(tiny_dataset_dir, tmp_path,
                                                        monkeypatch):
    """The NaN step is the epoch's last: the epoch's saved weights are those it found."""
    run = tmp_path / "run"
    seen = inject_nan(monkeypatch, at={3})
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1", "--on-nan", "skip")
    saved = load_file(run / "state" / "model.safetensors")
    for name, tensor in seen["weights"].items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)


def test_on_nan_is_checked():
    with pytest.raises(ValueError, match="unknown --on-nan 'ignore'"):
        TrainingConfig(output_dir="x", on_nan="ignore")


def load_script_main():
    from tests.helpers import load_script

    return load_script("pretrain_id").main


# Run by each process of a 2-process launch: rank 1 alone gets a NaN loss in step 2.
RANK_1_NAN = """
import os, runpy, sys, torch
from peftrec.pretraining.recommender import SequentialRecommender
forward, calls = SequentialRecommender.forward, [0]
def nan_on_rank_1(self, batch):
    out = forward(self, batch)
    if self.training:
        calls[0] += 1
        if calls[0] == 2 and os.environ["RANK"] == "1":
            out = {**out, "loss": out["loss"] * torch.tensor(float("nan"))}
    return out
SequentialRecommender.forward = nan_on_rank_1
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_on_one_process_decides_for_every_process(mode, tiny_dataset_dir, tmp_path):
    wrapper = tmp_path / "nan_on_rank_1.py"
    wrapper.write_text(RANK_1_NAN)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "1"}
    run = tmp_path / "run"
    command = [*launcher, str(wrapper), str(ROOT / "scripts" / "pretrain_id.py"),
               "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), *SMALL,
               "--epochs", "1", "--on-nan", mode]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if mode == "stop":
        # Every process stops at step 2 (none waits forever in a collective) with the same
        # error, naming the users of rank 1's batch (the launcher may end one process
        # before it prints).
        errors = re.findall(r"error: non-finite[^\n]*", result.stderr)
        assert result.returncode != 0 and errors, failure_report(result)
        assert len(set(errors)) == 1
        users = re.search(r"in step 2 \(epoch 1, batch of users ([^)]*)\)", errors[0])
        assert users and len(users.group(1).split(", ")) == 16, errors[0]
        return
    assert result.returncode == 0, failure_report(result)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["skipped_steps"] == 1
    # 60 users over 2 processes of 16 per batch: 2 steps, the second skipped everywhere.
    assert json.loads((run / "state" / "trainer_state.json").read_text())["global_step"] == 1
