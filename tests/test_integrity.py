"""Content hashes checked on load (issue 23): a truncated or altered checkpoint, adapter
file, dataset folder, training state or encoder cache is refused by name (a cache is
rebuilt), a resume falls back to the last good state, and a full disk during a save leaves
the previous checkpoint whole."""

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from peftrec.adapters import HoulsbyConfig, get_adapted_model
from peftrec.adapters.checkpoint import AdapterCheckpointError, read_adapter_config, save_adapter
from peftrec.dataset_tools import DataError, load_dataset_folder
from peftrec.dataset_tools.checkpoints import CheckpointError
from peftrec.dataset_tools.integrity import CHECKSUMS
from peftrec.modality_encoders.cache import cached, load_cached, save_cached
from peftrec.pretraining.cli import run_main
from peftrec.pretraining.recommender import (
    RecommenderConfig,
    SequentialRecommender,
    checkpoint_fingerprint,
    load_recommender_config,
)
from tests.helpers import SMALL, load_script, run_pretrain, weights

TINY = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 5}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_last_byte(path: Path) -> None:
    """Alter a file without changing its size (the last byte lies in the tensor data)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {"truncated": truncate, "altered": flip_last_byte}


def tiny_model() -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=10, backbone_config=TINY))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, damage):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / CHECKSUMS).is_file()
    load_recommender_config(tmp_path / "ckpt")  # intact: loads
    DAMAGES[damage](tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or altered"):
        SequentialRecommender.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="truncated or altered"):
        checkpoint_fingerprint(tmp_path / "ckpt")


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / CHECKSUMS).unlink()
    loaded = SequentialRecommender.from_pretrained(tmp_path / "ckpt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_adapter_file_is_refused_by_name(tmp_path, damage):
    model = get_adapted_model(tiny_model(), HoulsbyConfig())
    save_adapter(model, tmp_path / "adapter", HoulsbyConfig(), "base")
    read_adapter_config(tmp_path / "adapter")
    DAMAGES[damage](tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckpointError,
                       match=r"adapter_model\.safetensors is truncated or altered"):
        read_adapter_config(tmp_path / "adapter")


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_dataset_folder_is_refused_by_name(tiny_dataset_dir, tmp_path, damage):
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, folder)
    load_dataset_folder(folder)
    arrow = next((folder / "sequences").glob("*.arrow"))
    DAMAGES[damage](arrow)
    with pytest.raises(DataError, match=rf"{arrow.name} is truncated or altered.*prepare_data"):
        load_dataset_folder(folder)
    shutil.copy(tiny_dataset_dir / "dataset_info.json", folder / "dataset_info.json")
    (folder / "items" / "dataset_info.json").unlink()
    with pytest.raises(DataError, match=r"items/dataset_info\.json is missing"):
        load_dataset_folder(folder)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_encoder_cache_is_rebuilt(tmp_path, caplog, damage):
    path, outputs = tmp_path / "cache.safetensors", torch.arange(12.0).reshape(3, 4)
    save_cached(path, "key", outputs)
    assert torch.equal(load_cached(path, "key", (3, 4)), outputs)
    DAMAGES[damage](path)
    with caplog.at_level(logging.WARNING):
        assert load_cached(path, "key", (3, 4)) is None
    assert str(path) in caplog.text
    rebuilt = cached(path, "key", (3, 4), lambda: outputs.clone())
    assert torch.equal(rebuilt, outputs) and torch.equal(load_cached(path, "key"), outputs)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = tiny_model()
    first.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr("peftrec.dataset_tools.checkpoints.save_file", disk_full)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        SequentialRecommender(first.config).save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial sibling
    SequentialRecommender.from_pretrained(tmp_path / "ckpt")


def test_a_full_disk_stops_a_script_with_one_line(tiny_dataset_dir, tmp_path, monkeypatch,
                                                   capsys):
    def disk_full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr("peftrec.dataset_tools.checkpoints.save_file", disk_full)
    with pytest.raises(SystemExit) as stop:
        run_main(load_script("pretrain_id").main,
                 ["--dataset", str(tiny_dataset_dir), "--output-dir", str(tmp_path / "run"),
                  *SMALL])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device writing" in errors[0]
    assert "model.safetensors" in errors[0] and "Traceback" not in err


def test_a_resume_falls_back_to_the_last_good_state(tiny_dataset_dir, tmp_path, capsys):
    run_pretrain(tiny_dataset_dir, tmp_path / "full", "--epochs", "3", "--patience", "9")
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--patience", "9")
    saved = json.loads((run / "state.old" / "trainer_state.json").read_text())
    assert saved["epoch"] == 1  # the save before state/ is kept
    flip_last_byte(run / "state" / "model.safetensors")
    resumed = run_pretrain(tiny_dataset_dir, run, "--epochs", "3", "--patience", "9",
                           "--resume")
    assert f"falling back to the previous saved state, {run / 'state.old'}" in (
        capsys.readouterr().out)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    for name, tensor in weights(tmp_path / "full").items():
        assert torch.equal(weights(run)[name], tensor), name
    # Epoch 2 was trained again: its log row is not there twice.
    assert [json.loads(row)["epoch"] for row in (run / "log.jsonl").read_text().splitlines()
            ] == [1, 2, 3]
    # Every saved state damaged: refused by name, nothing trained.
    for state in ("state", "state.old"):
        truncate(run / state / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"cannot --resume .*state/optimizer\.bin is "
                                              r"truncated or altered.*without --resume"):
        run_pretrain(tiny_dataset_dir, run, "--epochs", "4", "--resume")
