"""Shared fixtures: a small synthetic dataset with learnable sequential structure."""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

# Flags of the small models and CPU training runs the transfer tests pretrain and fine-tune.
MODEL = ["--hidden-size", "16", "--num-heads", "2", "--ffn-size", "32", "--max-len", "20"]
TRAIN = ["--batch-size", "16", "--eval-batch-size", "16", "--report-to", "none", "--cpu"]


def write_synthetic_interactions(path: Path, num_users: int = 60, num_items: int = 40,
                                 seed: int = 0) -> Path:
    """Write a CSV (user_id,item_id,timestamp,rating) where the next item is mostly predictable.

    Each user walks the catalog in a fixed cyclic order (item i is followed by i+1) from a
    random start, with a 10% chance of jumping to a random item; 8-25 interactions per
    user, strictly increasing timestamps. A sequence model should learn "next = previous + 1".
    """
    rng = random.Random(seed)
    rows = []
    for u in range(num_users):
        item = rng.randrange(num_items)
        t = 1_600_000_000 + rng.randrange(86_400)
        for _ in range(rng.randint(8, 25)):
            rows.append((f"u{u}", f"i{item}", t, rng.randint(1, 5)))
            item = rng.randrange(num_items) if rng.random() < 0.1 else (item + 1) % num_items
            t += rng.randint(60, 3_600)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        writer.writerows(rows)
    return path


def write_synthetic_items(path: Path, num_items: int = 40, num_groups: int = 5) -> Path:
    """Write item titles/genres for the synthetic catalog; consecutive items share a group."""
    size = -(-num_items // num_groups)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "genre"])
        for i in range(num_items):
            writer.writerow([f"i{i}", f"Item {i} of group {i // size}", f"group{i // size}"])
    return path


def perturb_adapters(model, scale: float = 0.1) -> None:
    """Move every adapter parameter off its (partly zero) init by seeded noise, so a test
    can check that the adapters really are on the forward path. Random, not constant:
    LayerNorm cancels a shift shared by all dims."""
    import torch

    from adapters.base import adapter_parameter_ids

    owned = adapter_parameter_ids(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in owned:
                param.add_(scale * torch.randn_like(param))


def random_item_batch(num_items: int = 30, batch: int = 4, length: int = 8) -> dict:
    """Random training sequences [batch, length] with left padding in the first row."""
    import torch

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, num_items + 1, (batch, length), generator=generator)
    inputs[0, :3] = 0
    targets = torch.randint(1, num_items + 1, (batch, length), generator=generator)
    targets[0, :3] = 0
    return {"input_ids": inputs, "target_ids": targets}


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetune(methods, *argv: str) -> dict:
    """A fine-tuning run (TRAIN, then `argv`) with the adapter `methods` (none: the
    baselines' parser); its metrics."""
    from downstream.cli import finetune_parser, run_finetune
    from pretraining.cli import parse_args

    return run_finetune(parse_args(finetune_parser("t", methods), [*TRAIN, *argv]))


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset folder (k_core=2) built from ``write_synthetic_interactions``."""
    from dataset_tools import PrepareConfig, prepare_dataset

    raw = tmp_path_factory.mktemp("tiny_raw")
    inter = write_synthetic_interactions(raw / "interactions.csv")
    items = write_synthetic_items(raw / "items.csv")
    return prepare_dataset(
        inter, "csv", tmp_path_factory.mktemp("tiny") / "tiny", PrepareConfig(k_core=2),
        items_path=items, user_col="user_id", item_col="item_id", time_col="timestamp",
        rating_col="rating",
    )


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A target domain with another catalog (30 items, other users) than the source."""
    from dataset_tools import PrepareConfig, prepare_dataset

    raw = tmp_path_factory.mktemp("target_raw")
    inter = write_synthetic_interactions(raw / "inter.csv", num_users=40, num_items=30, seed=7)
    items = write_synthetic_items(raw / "items.csv", num_items=30)
    return prepare_dataset(
        inter, "csv", tmp_path_factory.mktemp("target") / "target", PrepareConfig(k_core=2),
        items_path=items, user_col="user_id", item_col="item_id", time_col="timestamp",
    )


@pytest.fixture(scope="module")
def text_base(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, Path]:
    """A text SASRec (tiny BERT without dropout, frozen + cached) pretrained on
    `tiny_dataset_dir` with the full softmax; (run, encoder cache)."""
    from pretraining.cli import parse_args, pretrain_parser
    from pretraining.pipeline import pretrain
    from tests.test_modality_encoders import save_bert

    root = tmp_path_factory.mktemp("text_base")
    encoder = save_bert(root / "bert", dropout=0.0)
    run = root / "run"
    pretrain(parse_args(pretrain_parser("t", modality="text"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "1",
        "--encoder", str(encoder), "--text-template", "{title} ({genre})",
        "--encoder-cache-dir", str(root / "cache"), *MODEL, *TRAIN]))
    return run, root / "cache"
