"""The distributed paths on CPU (issue 23): two processes (DDP over gloo, through
`accelerate launch`) train as one process does: the same data per optimizer step, split
over the processes and accumulation micro-batches, gives the same weights and metrics, with
a warm-up + cosine schedule, weight decay, clipping, mid-epoch saves and a resume in
between. And a model sharded by FSDP (fully_shard, one gloo process) evaluates as the plain
model does."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftrec.dataset_tools import load_dataset_folder
from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded
from peftrec.pretraining.evaluation import evaluate
from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
from tests.helpers import MODEL, ROOT, failure_report, free_port, run_pretrain

BATCH = 5
# Per optimizer step, 2 processes x 3 micro-batches or 1 process x 6: the same 30 sequences
# (the seedable sampler deals the same global order, batch k to process k mod 2).
# The flags' defaults (one window per user: the count above), not SASRec's default preset.
SETTINGS = ["--preset", "none", "--batch-size", str(BATCH), "--eval-batch-size", "16",
            "--report-to", "none",
            "--cpu", "--dropout", "0", "--scheduler", "cosine", "--warmup-steps", "2",
            "--weight-decay", "0.01", "--max-grad-norm", "1.0", "--save-steps", "1",
            "--lr", "5e-3", "--patience", "9"]


def launch_two_processes(argv: list[str]) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu --num_processes 2` silently starts ONE process (STACK.md).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(ROOT / "scripts" / "pretrain_id.py"), *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_with_gradient_accumulation_train_like_one(tiny_dataset_dir, tmp_path):
    train = LeaveOneOutDataset(load_dataset_folder(tiny_dataset_dir), "train", 20)
    assert len(train) % (BATCH * 6) == 0  # no partial step, no padded duplicates
    one = run_pretrain(tiny_dataset_dir, tmp_path / "one", *SETTINGS, "--epochs", "3",
                       "--grad-accum", "6")
    base = ["--dataset", str(tiny_dataset_dir), *MODEL, *SETTINGS, "--grad-accum", "3"]
    two_dir = tmp_path / "two"
    # Stopped after epoch 2 (step 4; the schedule's length stays that of --epochs 3), then
    # resumed in 2 processes for the third.
    for extra in (["--epochs", "3", "--max-steps", "4"], ["--epochs", "3", "--resume"]):
        result = launch_two_processes([*base, "--output-dir", str(two_dir), *extra])
        assert result.returncode == 0, failure_report(result)
    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["protocol"]["num_processes"] == 2 and two["training"]["epochs"] == 3
    for split in ("valid", "test"):
        assert two[split] == pytest.approx(one[split], abs=1e-6)
    expected = load_file(tmp_path / "one" / "state" / "model.safetensors")
    got = load_file(two_dir / "state" / "model.safetensors")
    for name, tensor in expected.items():
        # Sums in another order (all-reduce, then accumulation): equal to rounding.
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6)
    state = json.loads((two_dir / "state" / "trainer_state.json").read_text())
    assert state["global_step"] == json.loads(
        (tmp_path / "one" / "state" / "trainer_state.json").read_text())["global_step"]


def test_a_model_sharded_by_fsdp_evaluates_as_the_plain_model(tiny_dataset_dir):
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader

    data = load_dataset_folder(tiny_dataset_dir)
    torch.manual_seed(0)
    model = SequentialRecommender(RecommenderConfig(num_items=data.num_items, backbone_config={
        "hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32, "max_len": 20}))
    loader = DataLoader(LeaveOneOutDataset(data, "valid", 20), batch_size=16,
                        collate_fn=collate_left_padded)
    accelerator = Accelerator(cpu=True)
    plain = evaluate(model, loader, accelerator)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in model.backbone.layers:  # as fsdp.yaml wraps: per block, then the root
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # Outside forward() the root's parameters stay sharded (DTensors): query() alone
        # fails with "mixed torch.Tensor and DTensor".
        assert type(model.item_encoder.embedding.weight).__name__ == "DTensor"
        sharded = evaluate(model, loader, accelerator)
        assert type(model.item_encoder.embedding.weight).__name__ == "DTensor"  # resharded
    finally:
        dist.destroy_process_group()
    assert sharded == plain
