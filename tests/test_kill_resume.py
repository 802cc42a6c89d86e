"""Exact resume after SIGKILL (issue 23): a real script process is killed at a chosen point
(a training step, an evaluation batch, the middle of a checkpoint write, a random time) and
resumed with --resume; it must end with the metrics and the weights of a run never
interrupted. The kill points are set by KILL_AT, read by a small hook that wraps the
script (written to the test's folder: nothing in peftrec knows about it)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, SMALL, TRAIN, failure_report

# Runs the script named by argv[1] with the rest of argv, after wrapping what KILL_AT
# ("step:N", "eval:N", "save:N", "time:SECONDS") names so that the process SIGKILLs itself
# there: before the N-th training micro-step, during the N-th evaluation batch, or half-way
# through the N-th checkpoint file write (best checkpoint or training state); "time" kills
# a random time (up to SECONDS) after the first training step.
HOOK = '''
import os, random, runpy, signal, sys, threading
from pathlib import Path

kind, value = os.environ["KILL_AT"].split(":")
calls = {"n": 0}

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def nth_call():
    calls["n"] += 1
    return calls["n"] == int(value)

from peftrec.pretraining.recommender import SequentialRecommender
from peftrec.pretraining.trainer import Trainer

if kind in ("step", "time"):
    train_step = Trainer._train_step
    def killing_step(self, *args):
        if kind == "step" and nth_call():
            kill()
        if kind == "time" and calls["n"] == 0:
            calls["n"] = 1
            threading.Timer(random.uniform(0, float(value)), kill).start()
        return train_step(self, *args)
    Trainer._train_step = killing_step

if kind == "eval":
    query = SequentialRecommender.query
    def killing_query(self, *args, **kwargs):
        if not self.training and nth_call():
            kill()
        return query(self, *args, **kwargs)
    SequentialRecommender.query = killing_query

if kind == "save":
    import accelerate.checkpointing
    import peftrec.dataset_tools.checkpoints as checkpoints_module

    def half_written(write, path_of):
        def write_then_die(*args, **kwargs):
            write(*args, **kwargs)
            if nth_call():
                path = Path(path_of(args, kwargs))
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                kill()
        return write_then_die

    checkpoints_module.save_file = half_written(
        checkpoints_module.save_file, lambda args, kwargs: args[1])
    accelerate.checkpointing.save = half_written(
        accelerate.checkpointing.save, lambda args, kwargs: args[1])

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# Three epochs with a state saved every 3 optimizer steps (4 per epoch): resumes start
# mid-epoch and at epoch ends.
PRETRAIN = [*SMALL, "--epochs", "3", "--save-steps", "3", "--patience", "9"]
FINETUNE = [*TRAIN, "--epochs", "2", "--save-steps", "3", "--layers", "top:1",
            "--reduction-factor", "4"]


def run_script(script: str, argv: list[str], kill_at: str | None = None,
               hook: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "scripts" / script), *argv]
    if kill_at is not None:
        env["KILL_AT"] = kill_at
        command = [sys.executable, str(hook), *command[1:]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def killed_then_resumed(script: str, argv: list[str], kill_points: list[str],
                        tmp_path: Path) -> None:
    """Run the script killed at the first of `kill_points`, resume it killed at the next, and
    so on, then resume it to the end. Each point counts from the start of its own process:
    one process per kill, not a fresh run and a resume each."""
    hook = tmp_path / "kill_hook.py"
    hook.write_text(HOOK)
    for number, kill_at in enumerate(kill_points):
        killed = run_script(script, argv if number == 0 else [*argv, "--resume"], kill_at, hook)
        if kill_at.startswith("time"):  # it may land after the run ended
            assert killed.returncode in (0, -signal.SIGKILL), failure_report(killed)
        else:
            assert killed.returncode == -signal.SIGKILL, f"{kill_at}: {failure_report(killed)}"
    resumed = run_script(script, [*argv, "--resume"])
    assert resumed.returncode == 0, failure_report(resumed)


def assert_same_run(run: Path, reference: Path, weights_file: str) -> None:
    metrics, expected = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    assert metrics["valid"] == expected["valid"] and metrics["test"] == expected["test"]
    for name in ("state/model.safetensors", f"best_model/{weights_file}"):
        got, want = load_file(run / name), load_file(reference / name)
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{name}: {key}"
    rows, expected_rows = ([json.loads(line)["epoch"] for line in
                            (r / "log.jsonl").read_text().splitlines()] for r in (run, reference))
    assert rows == expected_rows


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_script("pretrain_id.py", ["--dataset", str(tiny_dataset_dir),
                                           "--output-dir", str(run), *PRETRAIN])
    assert result.returncode == 0, failure_report(result)
    return run


# A state is saved every 3 steps and at each epoch's end (4 steps an epoch); each writes
# the model, the optimizer, the scheduler. Each kill leaves the run folder as the same kill
# in a fresh run would (counted there: save 2, save 4, step 6, eval 6):
#   save 2: half-way through the optimizer file of the first state (step 3): no state
#           saved, so the resume starts fresh and counts its writes as a fresh run does;
#   save 4: half-way through the best checkpoint of epoch 1, after the state of step 3;
#   step 3: resumed from step 3, before step 6 (mid-epoch 2);
#   eval 2: resumed from epoch 1's end, in the second batch of epoch 2's validation;
#   time 3: resumed from step 6, a random time up to 3 s after its first step.
@pytest.mark.slow
def test_pretraining_killed_anywhere_resumes_exactly(uninterrupted, tiny_dataset_dir, tmp_path):
    run = tmp_path / "run"
    killed_then_resumed("pretrain_id.py", ["--dataset", str(tiny_dataset_dir), "--output-dir",
                                           str(run), *PRETRAIN],
                        ["save:2", "save:4", "step:3", "eval:2", "time:3"], tmp_path)
    assert_same_run(run, uninterrupted, "model.safetensors")


@pytest.fixture(scope="module")
def adapter_runs(uninterrupted, target_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """The fine-tuning flags (on the uninterrupted base) and their uninterrupted run."""
    argv = ["--pretrained", str(uninterrupted), "--dataset", str(target_dir), *FINETUNE]
    run = tmp_path_factory.mktemp("adapter") / "run"
    result = run_script("adapter_houlsby.py", [*argv, "--output-dir", str(run)])
    assert result.returncode == 0, failure_report(result)
    return argv, run


# 3 steps an epoch: the state of step 3 is saved before epoch 1's validation. As counted
# in a fresh run: eval 2, save 4, step 4:
#   eval 2: in the second batch of epoch 1's validation (the state of step 3 saved);
#   save 1: resumed from step 3, half-way through the adapter checkpoint of epoch 1;
#   step 1: resumed from step 3 again, before step 4 (mid-epoch 2).
@pytest.mark.slow
def test_an_adapter_run_killed_anywhere_resumes_exactly(adapter_runs, tmp_path):
    argv, reference = adapter_runs
    run = tmp_path / "run"
    killed_then_resumed("adapter_houlsby.py", [*argv, "--output-dir", str(run)],
                        ["eval:2", "save:1", "step:1"], tmp_path)
    assert_same_run(run, reference, "adapter_model.safetensors")
