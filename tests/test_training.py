"""The Trainer and the scripts end to end on the synthetic fixture: runs, resumes, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftrec.pretraining import Trainer
from peftrec.pretraining.cli import evaluate_parser, parse_args, pretrain_parser, run_main
from peftrec.pretraining.pipeline import evaluate_run
from peftrec.pretraining.trainer import TrainingConfig, one_cycle_factor
from tests.helpers import (
    SMALL,
    failure_report,
    free_port,
    load_script,
    run_pretrain,
    weights,
    write_synthetic_interactions,
)

ROOT = Path(__file__).resolve().parents[1]


def test_one_epoch_writes_the_run_folder_contract(tiny_dataset_dir, tmp_path):
    metrics = run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "1")
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "log.jsonl", "best_model/model.safetensors",
                 "best_model/config.json", "state/trainer_state.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved) >= {"valid", "test", "protocol"}
    assert set(saved["test"]) >= {"ndcg@10", "hr@10", "mrr", "hr@5", "ndcg@20"}
    protocol = saved["protocol"]
    assert protocol["ranking"] == "full" and protocol["mask_history"] is False
    assert protocol["num_users"] == 60 and protocol["num_processes"] == 1
    assert protocol["max_users"] is None
    assert saved["test"] == metrics["test"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"]["fingerprint"] == config["model"]["dataset_fingerprint"]


def test_sasrec_learns_the_fixture_sequences(tiny_dataset_dir, tmp_path):
    # The fixture's next item is the previous one + 1 about 90% of the time.
    metrics = run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "40", "--lr", "5e-3",
                           "--dropout", "0.0")
    assert metrics["test"]["hr@10"] > 0.6
    assert metrics["test"]["ndcg@10"] > 0.4  # a popularity ranker scores about 0.1 here


def test_resume_after_an_epoch_equals_an_uninterrupted_run(tiny_dataset_dir, tmp_path):
    run_pretrain(tiny_dataset_dir, tmp_path / "full", "--epochs", "2")
    run_pretrain(tiny_dataset_dir, tmp_path / "split", "--epochs", "1")
    run_pretrain(tiny_dataset_dir, tmp_path / "split", "--epochs", "2", "--resume")
    state = json.loads((tmp_path / "split" / "state" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 8  # 60 users / 16 = 4 steps/epoch
    trained = json.loads((tmp_path / "split" / "metrics.json").read_text())
    # Resuming a finished run re-evaluates it; the summary is still the training run's.
    again = run_pretrain(tiny_dataset_dir, tmp_path / "split", "--epochs", "2", "--resume")
    assert again["test"] == trained["test"] and again["training"] == trained["training"]
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0)


def test_the_training_summary_covers_every_epoch_across_resumes(tiny_dataset_dir, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1")
    (run / "metrics.json").unlink()  # as if stopped after the epoch, before its evaluation
    finished = run_pretrain(tiny_dataset_dir, run, "--epochs", "1", "--resume")["training"]
    logged = [json.loads(line)["seconds"] for line in (run / "log.jsonl").open()]
    assert finished["seconds_per_epoch"] == pytest.approx(logged[0])
    assert finished["target_positions_per_second"] > 0 and finished["peak_memory_mb"] > 0
    longer = run_pretrain(tiny_dataset_dir, run, "--epochs", "3", "--resume")["training"]
    logged = [json.loads(line)["seconds"] for line in (run / "log.jsonl").open()]
    assert len(logged) == 3
    assert longer["seconds_per_epoch"] == pytest.approx(sum(logged) / 3)


def test_early_stopping_says_why_and_a_larger_patience_trains_on(tiny_dataset_dir, tmp_path,
                                                                  capsys):
    """At a rate too small to move float32 weights, validation never passes epoch 1's."""
    run, frozen = tmp_path / "run", ("--lr", "1e-12", "--epochs", "4")
    assert run_pretrain(tiny_dataset_dir, run, *frozen, "--patience", "1")["training"][
        "epochs"] == 2
    assert "early stopping after epoch 2" in capsys.readouterr().out
    run_pretrain(tiny_dataset_dir, run, *frozen, "--patience", "1", "--resume")
    assert "--resume with a larger --patience" in capsys.readouterr().out
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # trained nothing
    assert run_pretrain(tiny_dataset_dir, run, *frozen, "--patience", "2", "--resume")[
        "training"]["epochs"] == 3
    assert "early stopping after epoch 3" in capsys.readouterr().out


def test_resume_trains_at_the_lr_it_is_given(tiny_dataset_dir, tmp_path):
    """A resume restores the optimizer and scheduler, but trains at its own --lr."""
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1", "--lr", "1e-2")
    run_pretrain(tiny_dataset_dir, run, "--epochs", "3", "--lr", "1e-3", "--resume")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in log] == pytest.approx([1e-2, 1e-3, 1e-3])


def test_step_schedule_drops_the_rate_after_each_decay_epoch(tiny_dataset_dir, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "4", "--lr", "1e-2", "--scheduler", "step",
                 "--decay-epochs", "1", "3", "--decay-factor", "0.5")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in log] == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3])


def test_step_schedule_equals_stopping_and_resuming_at_the_lower_rate(tiny_dataset_dir, tmp_path):
    """The planned decay is the stop-and-resume recipe in one run, to the last bit."""
    run_pretrain(tiny_dataset_dir, tmp_path / "planned", "--epochs", "2", "--lr", "1e-2",
                 "--scheduler", "step", "--decay-epochs", "1", "--decay-factor", "0.5")
    run_pretrain(tiny_dataset_dir, tmp_path / "chained", "--epochs", "1", "--lr", "1e-2")
    run_pretrain(tiny_dataset_dir, tmp_path / "chained", "--epochs", "2", "--lr", "5e-3",
                 "--resume")
    planned, chained = weights(tmp_path / "planned"), weights(tmp_path / "chained")
    for name in planned:
        torch.testing.assert_close(planned[name], chained[name], rtol=0, atol=0)


def test_a_resume_may_switch_to_a_step_schedule_whose_decay_has_passed(
        tiny_dataset_dir, tmp_path):
    """Constant for an epoch, then resumed with a decay after epoch 1: every step of epoch 2,
    the first one too, trains at the decayed rate, as in the run planned that way."""
    decay = ["--scheduler", "step", "--decay-epochs", "1", "--decay-factor", "0.5"]
    run_pretrain(tiny_dataset_dir, tmp_path / "planned", "--epochs", "2", "--lr", "1e-2", *decay)
    run_pretrain(tiny_dataset_dir, tmp_path / "switched", "--epochs", "1", "--lr", "1e-2")
    run_pretrain(tiny_dataset_dir, tmp_path / "switched", "--epochs", "2", "--lr", "1e-2",
                 *decay, "--resume")
    planned, switched = weights(tmp_path / "planned"), weights(tmp_path / "switched")
    for name in planned:
        torch.testing.assert_close(planned[name], switched[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"scheduler": "step"}, "step needs it"),
        ({"decay_epochs": (3,)}, "--decay-epochs goes with --scheduler step"),
        ({"scheduler": "step", "decay_epochs": (5, 3)}, "increasing epochs >= 1, got [5, 3]"),
        ({"scheduler": "step", "decay_epochs": (0,)}, "increasing epochs >= 1, got [0]"),
        ({"scheduler": "step", "decay_epochs": (3,), "decay_factor": 0.0}, "in (0, 1], got 0.0"),
        ({"scheduler": "linear"}, "unknown --scheduler 'linear'"),
    ],
)
def test_bad_schedule_settings_are_named(settings, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainingConfig(output_dir=str(tmp_path), **settings)


def test_resume_mid_epoch_continues_from_the_saved_step(tiny_dataset_dir, tmp_path, monkeypatch):
    run_pretrain(tiny_dataset_dir, tmp_path / "full", "--epochs", "1")
    original = Trainer._save_state
    calls = []

    def save_then_crash(self):
        original(self)
        calls.append(self.state.global_step)
        if self.state.global_step == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(Trainer, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_dataset_dir, tmp_path / "split", "--epochs", "1", "--save-steps", "2")
    monkeypatch.setattr(Trainer, "_save_state", original)
    saved = json.loads((tmp_path / "split" / "state" / "trainer_state.json").read_text())
    assert saved["batches_in_epoch"] == 2 and saved["epoch"] == 0
    run_pretrain(tiny_dataset_dir, tmp_path / "split", "--epochs", "1", "--save-steps", "2",
                 "--resume")
    state = json.loads((tmp_path / "split" / "state" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 1
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0)


def test_existing_run_is_not_overwritten_and_resume_checks_settings(tiny_dataset_dir, tmp_path):
    run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "1")
    before = (tmp_path / "run" / "best_model" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "1")
    with pytest.raises(ValueError, match=r"model settings differ \(\['backbone_config'\]\)"):
        run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "2", "--resume",
                     "--num-layers", "3")
    assert (tmp_path / "run" / "best_model" / "model.safetensors").read_bytes() == before


def test_a_run_written_before_a_setting_existed_resumes_with_its_old_behaviour(
        tiny_dataset_dir, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--preset", "none", "--epochs", "1")
    config = json.loads((run / "config.json").read_text())
    # as written before --train-windows, content item encoders, --repeat-bias and presets
    # existed: it resumes without SASRec's default preset, with no flag to say so
    del config["dataset"]["train_windows"], config["model"]["item_encoder_config"]
    del config["model"]["repeat_bias"], config["preset"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"dataset settings differ \(\['train_windows'\]\)"):
        run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--resume", "--train-windows", "all")
    run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--resume")
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def test_a_run_with_a_setting_this_version_lacks_is_refused_by_name(tiny_dataset_dir, tmp_path):
    from peftrec.dataset_tools.integrity import write_checksums
    from peftrec.pretraining.recommender import CheckpointError, SequentialRecommender

    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1")
    for config_file in (run / "config.json", run / "best_model" / "config.json"):
        config = json.loads(config_file.read_text())
        model = config["model"] if "model" in config else config["config"]
        model["backbone_config"]["rotary"] = True  # as if written by a newer peftrec
        config_file.write_text(json.dumps(config))
    write_checksums(run / "best_model")
    log = (run / "log.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"cannot --resume .*unknown sasrec settings "
                                              r"\['rotary'\].*Upgrade peftrec"):
        run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--resume")
    with pytest.raises(CheckpointError, match=r"unknown sasrec settings \['rotary'\]"):
        SequentialRecommender.from_pretrained(run / "best_model")
    assert (run / "log.jsonl").read_text() == log


def test_evaluate_refuses_a_checkpoint_of_another_dataset(tiny_dataset_dir, tmp_path):
    from peftrec.dataset_tools import PrepareConfig, prepare_dataset

    run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "1")
    raw = write_synthetic_interactions(tmp_path / "other.csv", seed=1)
    other = prepare_dataset(raw, "csv", tmp_path / "other", PrepareConfig(k_core=2),
                            user_col="user_id", item_col="item_id", time_col="timestamp")
    argv = ["--run", str(tmp_path / "run"), "--dataset", str(other), "--cpu"]
    args = parse_args(evaluate_parser("t"), argv)
    with pytest.raises(ValueError, match="trained on another dataset"):
        evaluate_run(args)


def script(name: str, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [*(launcher or [sys.executable]), str(ROOT / "scripts" / name), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "ml-10m"], "neither a built-in"),
        (["--num-heads", "3"], "not divisible by --num-heads"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--scheduler", "step"], "step needs it: e.g. --scheduler step --decay-epochs 30 40"),
    ],
)
def test_bad_flags_fail_with_one_line_and_no_traceback(args, message, tmp_path, capsys):
    # In this process, through run_main as the script's __main__ calls it: a process each
    # would cost seconds of imports. The next test runs the script as a real process.
    with pytest.raises(SystemExit) as exit_info:
        run_main(load_script("pretrain_id").main,
                 [*SMALL, "--output-dir", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert stderr.startswith("error: ")


def test_unknown_config_key_is_an_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    result = script("pretrain_id.py", "--config", str(config))
    assert result.returncode == 2 and "unknown settings ['learning_rate']" in result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_config_file_values_are_overridden_by_flags(tiny_dataset_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 5\nhidden-size: 16\nlr: 0.01\n")
    args = parse_args(pretrain_parser("t"), ["--config", str(config), "--epochs", "1"])
    assert (args.epochs, args.hidden_size, args.lr) == (1, 16, 0.01)


def parser_of(script: str):
    """A script's `parse_arguments`, or the parser behind one of the shared vocabularies."""
    if script == "finetune":
        from peftrec.downstream.cli import finetune_parser

        return lambda argv: parse_args(finetune_parser("t"), argv)
    if script == "evaluate":
        return lambda argv: parse_args(evaluate_parser("t"), argv)
    if script == "pretrain_image":
        return lambda argv: parse_args(pretrain_parser("t", "image"), argv)
    return load_script(script).parse_arguments


# script, the YAML file (it gives every required flag), the settings it must set
REQUIRED_FROM_CONFIG = [
    ("finetune", "pretrained: runs/base\n", {"pretrained": Path("runs/base")}),
    ("evaluate", "run: runs/base\n", {"run": Path("runs/base")}),
    ("pretrain_image", "encoder: vit\nimage-store: data/images\n",
     {"encoder": "vit", "image_store": "data/images"}),
    ("prepare_data", "dataset: ml-1m\noutput: data/ml-1m\n",
     {"dataset": "ml-1m", "output": Path("data/ml-1m")}),
    ("prepare_data", "input: log.csv\nformat: csv\noutput: data/x\n",
     {"input": Path("log.csv"), "output": Path("data/x")}),
    ("build_image_store", "source: images\noutput_dir: data/images\n",
     {"source": Path("images"), "output_dir": Path("data/images")}),
    ("split_domains", "dataset: ml-1m\nfield: genre\nsource-values: Comedy\n"
     "source-output: a\ntarget-output: b\n", {"field": "genre", "source_values": "Comedy"}),
]


@pytest.mark.parametrize("script, text, expected", REQUIRED_FROM_CONFIG,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(REQUIRED_FROM_CONFIG)])
def test_required_flags_may_come_from_the_config_file(script, text, expected, tmp_path,
                                                      capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    args = parser_of(script)(["--config", str(config)])
    assert {name: getattr(args, name) for name in expected} == expected
    # One required setting left out of the file: argparse's own error names it.
    first = text.splitlines()[0]
    config.write_text(text.replace(first + "\n", ""))
    with pytest.raises(SystemExit) as exit_info:
        parser_of(script)(["--config", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "required" in error and first.split(":")[0] in error, error


def test_a_flag_of_an_exclusive_group_replaces_the_config_files_choice(tmp_path):
    from peftrec.pretraining.cli import CommandLineError

    parse_arguments = load_script("prepare_data").parse_arguments
    config = tmp_path / "run.yaml"
    config.write_text("dataset: ml-1m\noutput: data/x\n")
    args = parse_arguments(["--config", str(config), "--input", "log.csv", "--format", "csv"])
    assert (args.input, args.dataset) == (Path("log.csv"), None)
    config.write_text("dataset: ml-1m\ninput: log.csv\noutput: data/x\n")
    with pytest.raises(CommandLineError, match="dataset, input exclude each other"):
        parse_arguments(["--config", str(config)])


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process_evaluation(tiny_dataset_dir, tmp_path):
    # `accelerate launch --cpu --num_processes 2` silently starts ONE process (STACK.md).
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        result = script("pretrain_id.py", "--dataset", str(tiny_dataset_dir), "--output-dir",
                        str(tmp_path / "run"), *SMALL, "--epochs", "1", launcher=launcher)
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
    assert result.returncode == 0, failure_report(result)
    two = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert two["protocol"]["num_processes"] == 2
    assert two["protocol"]["num_users"] == 60  # no duplicated padding users in the metrics
    result = script("evaluate.py", "--run", str(tmp_path / "run"), "--cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    one = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert one["protocol"]["num_processes"] == 1
    assert one["valid"] == two["valid"] and one["test"] == two["test"]
    # A 2-process launch where Accelerate is not told to use the CPU would train two
    # independent copies: refused with a clear error.
    config = ROOT / "scripts" / "accelerate_configs" / "cpu_2proc.yaml"
    duplicated = script("evaluate.py", "--run", str(tmp_path / "run"),
                        launcher=[sys.executable, "-m", "accelerate.commands.launch",
                                  "--config_file", str(config)])
    assert duplicated.returncode != 0
    assert "the launcher started 2 processes but Accelerate sees 1" in duplicated.stderr
    # The 2-process training state resumes in one process.
    resumed = run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "2", "--resume")
    state = json.loads((tmp_path / "run" / "state" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and resumed["protocol"]["num_processes"] == 1


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_ddp", "fsdp", "multi_node", "cpu_2proc"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "scripts" / "accelerate_configs" / f"{name}.yaml"))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16")
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "SASRecBlock"


@pytest.mark.parametrize(("total", "rise"), [(10, None), (37, None), (100, None), (20, 8)])
def test_one_cycle_factor_is_torchs_one_cycle_lr(total, rise):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.01, total_steps=total, cycle_momentum=False,
        pct_start=rise / total if rise else 0.3)
    expected = []
    for step in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if step < total - 1:
            schedule.step()
    factor = one_cycle_factor(total, rise)
    assert [0.01 * factor(step) for step in range(total)] == pytest.approx(expected, rel=1e-12)


def _record_step_lrs(monkeypatch) -> list[float]:
    """The rate of every optimizer step the Trainer takes from now on."""
    rates, original = [], Trainer._train_step

    def recorded(self, batch, window, frozen_now):
        rates.append(self.optimizer.param_groups[0]["lr"])
        return original(self, batch, window, frozen_now)

    monkeypatch.setattr(Trainer, "_train_step", recorded)
    return rates


def test_one_cycle_rises_to_lr_then_falls_and_a_resume_continues_it_exactly(
        tiny_dataset_dir, tmp_path, monkeypatch):
    """5 epochs of 4 steps: the rate peaks at --lr on step 6 (30% of 20), and a run killed
    after epoch 2 and resumed takes the same rates and ends with the same weights."""
    cycle = ["--epochs", "5", "--lr", "1e-2", "--scheduler", "one_cycle", "--patience", "9"]
    rates = _record_step_lrs(monkeypatch)
    run_pretrain(tiny_dataset_dir, tmp_path / "full", *cycle)
    assert len(rates) == 20
    peak = rates.index(max(rates))
    assert peak == 5 and rates[peak] == pytest.approx(1e-2)
    assert rates[0] == pytest.approx(1e-2 / 25)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1], strict=True))
    assert all(a > b for a, b in zip(rates[peak:-1], rates[peak + 1:], strict=True))
    full_rates = list(rates)

    rates.clear()
    original = Trainer._save_state

    def save_then_crash(self):
        original(self)
        if self.state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_dataset_dir, tmp_path / "split", *cycle)
    monkeypatch.setattr(Trainer, "_save_state", original)
    run_pretrain(tiny_dataset_dir, tmp_path / "split", *cycle, "--resume")
    assert rates == pytest.approx(full_rates, rel=1e-12)
    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0)
