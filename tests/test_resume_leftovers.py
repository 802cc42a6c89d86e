"""What a kill in the middle of a save leaves (a half-written state.tmp/, the hidden
temporary siblings of the atomic writes) is cleaned up by --resume, which then ends as a run
never interrupted (issue 23)."""

import json
import shutil

import torch

from peftrec.dataset_tools import atomic
from peftrec.dataset_tools.atomic import clean_interrupted_writes
from tests.helpers import run_pretrain, weights


def half_of(source, destination) -> None:
    """A file cut off half-way, as a kill during its write leaves it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def test_resume_cleans_up_after_saves_cut_short(tiny_dataset_dir, tmp_path, capsys):
    reference = tmp_path / "uninterrupted"
    run_pretrain(tiny_dataset_dir, reference, "--epochs", "2")
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1")
    # Killed while saving the training state, the best checkpoint and log.jsonl.
    half_of(run / "state" / "model.safetensors", run / "state.tmp" / "model.safetensors")
    half_of(run / "best_model" / "model.safetensors",
            atomic._sibling(run / "best_model", "tmp") / "model.safetensors")
    half_of(run / "log.jsonl", atomic._sibling(run / "log.jsonl", "partial"))
    shutil.copytree(run / "best_model", atomic._sibling(run / "best_model", "old"))

    resumed = run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--resume")
    assert "--resume: cleaned up after interrupted saves: " in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    expected = json.loads((reference / "metrics.json").read_text())
    assert resumed["valid"] == expected["valid"] and resumed["test"] == expected["test"]
    for name, tensor in weights(reference).items():
        assert torch.equal(weights(run)[name], tensor), name


def test_a_folder_replaced_half_way_is_put_back(tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / ".hidden").write_text("kept")
    current = tmp_path / "state"
    current.mkdir()
    # Killed between the two renames of atomic_directory: the previous folder has been moved
    # aside, the new one not yet moved into place.
    replaced = atomic._sibling(tmp_path / "best_model", "old")
    replaced.mkdir()
    (replaced / "model.safetensors").write_text("previous")
    unfinished = atomic._sibling(tmp_path / "best_model", "tmp")
    unfinished.mkdir()

    assert sorted(clean_interrupted_writes(tmp_path)) == sorted([replaced.name, unfinished.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "best_model", "notes.txt",
                                                         "state"]
    assert (tmp_path / "best_model" / "model.safetensors").read_text() == "previous"
