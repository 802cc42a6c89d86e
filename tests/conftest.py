"""Shared fixtures: a small synthetic dataset with learnable sequential structure. Plain
helpers (functions, constants) live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import (
    MODEL,
    TRAIN,
    save_bert,
    write_synthetic_interactions,
    write_synthetic_items,
)

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset folder (k_core=2) built from ``write_synthetic_interactions``."""
    from peftrec.dataset_tools import PrepareConfig, prepare_dataset

    raw = tmp_path_factory.mktemp("tiny_raw")
    inter = write_synthetic_interactions(raw / "interactions.csv")
    items = write_synthetic_items(raw / "items.csv")
    return prepare_dataset(
        inter, "csv", tmp_path_factory.mktemp("tiny") / "tiny", PrepareConfig(k_core=2),
        items_path=items, user_col="user_id", item_col="item_id", time_col="timestamp",
        rating_col="rating",
    )


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A target domain with another catalog (30 items, other users) than the source."""
    from peftrec.dataset_tools import PrepareConfig, prepare_dataset

    raw = tmp_path_factory.mktemp("target_raw")
    inter = write_synthetic_interactions(raw / "inter.csv", num_users=40, num_items=30, seed=7)
    items = write_synthetic_items(raw / "items.csv", num_items=30)
    return prepare_dataset(
        inter, "csv", tmp_path_factory.mktemp("target") / "target", PrepareConfig(k_core=2),
        items_path=items, user_col="user_id", item_col="item_id", time_col="timestamp",
    )


@pytest.fixture(scope="session")
def text_pretraining(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[Path, Path]:
    """A text SASRec (tiny BERT without dropout, frozen + cached) pretrained on
    `tiny_dataset_dir` with the full softmax, once a session; (run, encoder cache). Tests
    take it through `text_base`."""
    from peftrec.pretraining.cli import parse_args, pretrain_parser
    from peftrec.pretraining.pipeline import pretrain

    root = tmp_path_factory.mktemp("text_base")
    encoder = save_bert(root / "bert", dropout=0.0)
    run = root / "run"
    pretrain(parse_args(pretrain_parser("t", modality="text"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "1",
        "--encoder", str(encoder), "--text-template", "{title} ({genre})",
        "--encoder-cache-dir", str(root / "cache"), "--preset", "none", *MODEL, *TRAIN]))
    return run, root / "cache"


@pytest.fixture(scope="module")
def text_base(text_pretraining: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, Path]:
    """`text_pretraining`'s run and a copy of its encoder cache for each module: a module
    that fills the cache (other items, other layers) or counts encoder passes sees only
    its own entries."""
    run, cache = text_pretraining
    copy = tmp_path_factory.mktemp("text_cache") / "cache"
    shutil.copytree(cache, copy)
    return run, copy


@pytest.fixture
def initial_weights(monkeypatch) -> dict:
    """The weights of the model the Trainer is given (filled when a run starts):
    {name: tensor}."""
    from peftrec.pretraining import Trainer

    captured = {}
    original = Trainer.__init__

    def capture(self, model, *args, **kwargs):
        captured.update({name: t.detach().clone() for name, t in model.state_dict().items()})
        original(self, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", capture)
    return captured
