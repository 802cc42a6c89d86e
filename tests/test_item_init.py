"""--init-items-from and --freeze-items-epochs: pretrained item tables, kept for E epochs."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftrec.pretraining.recommender import CheckpointError
from peftrec.pretraining.trainer import TrainingConfig
from tests.helpers import run_pretrain, weights, write_synthetic_interactions

TABLE = "item_encoder.embedding.weight"
DIFFREC = ["--backbone", "diffrec", "--preset", "none", "--diffusion-steps", "20",
           "--num-seeds", "2", "--num-layers", "1"]


@pytest.fixture(scope="module")
def source_run(tiny_dataset_dir, tmp_path_factory) -> Path:
    """A one-epoch SASRec run on the fixture: the source of item tables."""
    run = tmp_path_factory.mktemp("source") / "sasrec"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1")
    return run


def source_table(source_run: Path) -> torch.Tensor:
    return load_file(source_run / "best_model" / "model.safetensors")[TABLE]


def backbone_changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[name], after[name]) for name in after
               if name.startswith("backbone."))


@pytest.mark.parametrize("backbone", [[], DIFFREC], ids=["sasrec", "diffrec"])
def test_items_start_from_the_source_and_stay_frozen_for_e_epochs_across_resume(
    backbone, tiny_dataset_dir, source_run, initial_weights, tmp_path
):
    run = tmp_path / "run"
    # Weight decay too: a frozen table must not even decay.
    flags = [*backbone, "--init-items-from", str(source_run), "--freeze-items-epochs", "2",
             "--weight-decay", "0.1"]
    run_pretrain(tiny_dataset_dir, run, *flags, "--epochs", "1")
    assert torch.equal(initial_weights[TABLE], source_table(source_run))
    after_one = weights(run)
    assert torch.equal(after_one[TABLE], source_table(source_run))
    assert backbone_changed(initial_weights, after_one)
    run_pretrain(tiny_dataset_dir, run, *flags, "--epochs", "2", "--resume")
    after_two = weights(run)
    assert torch.equal(after_two[TABLE], source_table(source_run))
    assert backbone_changed(after_one, after_two)
    run_pretrain(tiny_dataset_dir, run, *flags, "--epochs", "3", "--resume")
    assert not torch.equal(weights(run)[TABLE], source_table(source_run))


def test_freezing_without_a_source_keeps_the_random_table(
    tiny_dataset_dir, initial_weights, tmp_path
):
    run_pretrain(tiny_dataset_dir, tmp_path / "run", "--freeze-items-epochs", "1",
                 "--epochs", "1")
    trained = weights(tmp_path / "run")
    assert torch.equal(trained[TABLE], initial_weights[TABLE])
    assert backbone_changed(initial_weights, trained)


def test_a_resume_with_another_source_is_refused(tiny_dataset_dir, source_run, tmp_path):
    other = tmp_path / "other-source"
    run_pretrain(tiny_dataset_dir, other, "--epochs", "1", "--seed", "7")
    # The best_model/ folder is accepted as well as the run folder.
    run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "1",
                 "--init-items-from", str(source_run / "best_model"))
    for flags in (["--init-items-from", str(other)], []):
        with pytest.raises(CheckpointError, match=r"model settings differ \(\['item_init'\]\)"):
            run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "2", "--resume", *flags)
    run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "2", "--resume",
                 "--init-items-from", str(source_run))


def test_a_source_of_another_dataset_or_width_fails_before_training(
    tiny_dataset_dir, source_run, tmp_path
):
    from peftrec.dataset_tools import PrepareConfig, prepare_dataset

    raw = write_synthetic_interactions(tmp_path / "other.csv", seed=1)
    other = prepare_dataset(raw, "csv", tmp_path / "other", PrepareConfig(k_core=2),
                            user_col="user_id", item_col="item_id", time_col="timestamp")
    with pytest.raises(CheckpointError, match="trained on another dataset"):
        run_pretrain(other, tmp_path / "a", "--init-items-from", str(source_run))
    with pytest.raises(CheckpointError, match="width 16, this model a 'id' one of width 8; "
                                              "pass --hidden-size 16"):
        run_pretrain(tiny_dataset_dir, tmp_path / "b", "--init-items-from", str(source_run),
                     "--hidden-size", "8")
    with pytest.raises(CheckpointError, match="no pretrained checkpoint there"):
        run_pretrain(tiny_dataset_dir, tmp_path / "c", "--init-items-from", str(tmp_path))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_freeze_settings_are_checked():
    with pytest.raises(ValueError, match="must be >= 0"):
        TrainingConfig(output_dir="x", freeze_epochs=-1)


def test_an_untied_output_table_starts_as_the_source_items_and_trains_while_they_are_frozen(
    tiny_dataset_dir, source_run, initial_weights, tmp_path
):
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, *DIFFREC, "--untied-output", "--init-items-from",
                 str(source_run), "--freeze-items-epochs", "5", "--epochs", "1")
    assert torch.equal(initial_weights["output_items"], source_table(source_run))
    trained = weights(run)
    assert torch.equal(trained[TABLE], source_table(source_run))
    assert not torch.equal(trained["output_items"], source_table(source_run))
