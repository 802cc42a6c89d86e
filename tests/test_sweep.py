"""scripts/sweep.py: a grid and a list of overrides over a script and seeds, checked before
anything runs, resumable, collected into one table; and the shipped sweep files."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftrec.downstream import sweep as sweeps
from peftrec.pretraining import pipeline
from peftrec.pretraining.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
# A tiny CPU pretraining run (the flags of the suite's small runs), one epoch.
TINY = {"hidden_size": 16, "num_heads": 2, "ffn_size": 32, "max_len": 20, "batch_size": 16,
        "eval_batch_size": 16, "report_to": "none", "cpu": True, "epochs": 1}


class Killed(Exception):
    """Stands for the process being killed."""


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def in_process(calls: list):
    """An executor running each command's script in this process (no interpreter start)."""

    def execute(command):
        calls.append(command)
        sweeps.script_module(Path(command[1]).stem).main(command[2:])
        return 0

    return execute


def sweep_args(path: Path, *flags: str):
    return sweeps.sweep_parser("test").parse_args([str(path), *flags])


def test_a_2x2_sweep_resumes_the_killed_run_and_skips_the_finished_ones(
        tiny_dataset_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "lr.yaml", script="pretrain_id", output_dir=str(out),
                       base={"dataset": str(tiny_dataset_dir), **TINY},
                       grid={"lr": ["1e-3", "2e-3"]}, seeds=[0, 1])
    calls = []
    run_one = in_process(calls)

    def killed_during_the_second(command):
        if len(calls) < 1:
            return run_one(command)
        # Trained and saved its state, then killed before writing metrics.json.
        def kill(*args, **kwargs):
            raise Killed

        with monkeypatch.context() as patch:
            patch.setattr(pipeline, "evaluate_model", kill)
            return run_one(command)

    with pytest.raises(Killed):
        sweeps.sweep_command(sweep_args(path), killed_during_the_second)
    first, second = out / "lr=1e-3" / "seed0", out / "lr=1e-3" / "seed1"
    assert (first / "metrics.json").is_file()
    assert (second / "config.json").is_file() and not (second / "metrics.json").exists()
    assert not (out / "lr=2e-3").exists()
    finished = {name: (first / name).stat().st_mtime_ns for name in
                ("metrics.json", "config.json", "log.jsonl", "best_model/model.safetensors")}
    capsys.readouterr()

    calls.clear()
    markdown = sweeps.sweep_command(sweep_args(path), in_process(calls))
    # The finished run is skipped, the killed one resumed, the two others run.
    assert [Path(c[c.index("--output-dir") + 1]) for c in calls] == [
        second, out / "lr=2e-3" / "seed0", out / "lr=2e-3" / "seed1"]
    assert ["--resume" in c for c in calls] == [True, False, False]
    assert "[1/4] lr=1e-3 seed 0: finished, skipped" in capsys.readouterr().out
    assert {name: (first / name).stat().st_mtime_ns for name in finished} == finished
    assert len((second / "log.jsonl").read_text().splitlines()) == 1  # not trained again
    assert all((out / c / f"seed{s}" / "metrics.json").is_file()
               for c in ("lr=1e-3", "lr=2e-3") for s in (0, 1))

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["lr"], r["seeds"]) for r in rows] == [
        ("lr=1e-3", "1e-3", "2"), ("lr=2e-3", "2e-3", "2")]
    metrics = [json.loads((out / "lr=2e-3" / f"seed{s}" / "metrics.json").read_text())
               for s in (0, 1)]
    mean = sum(m["test"]["ndcg@10"] for m in metrics) / 2
    assert float(rows[1]["test_ndcg@10_mean"]) == pytest.approx(mean, abs=1e-6)
    assert rows[1]["test_ndcg@10_sd"] != "" and rows[1]["valid_hr@10_mean"] != ""
    assert (out / "results.md").read_text() == markdown
    table = [line for line in markdown.splitlines() if line.startswith("| lr=")]
    assert len(table) == 2 and all(" ± " in line for line in table)
    assert "4 of 4 runs finished" in markdown


def test_dry_run_and_collect_only_run_nothing(tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", script="pretrain_id", output_dir=str(out),
                       base={"dataset": str(tiny_dataset_dir), **TINY}, seeds=[3])

    def never(command):
        raise AssertionError(f"ran {command}")

    assert sweeps.sweep_command(sweep_args(path, "--dry-run"), never) is None
    printed = capsys.readouterr().out
    assert "# [1/1] base seed 3: new" in printed
    assert f"--output-dir {out / 'base' / 'seed3'} --seed 3" in printed
    assert not out.exists()
    markdown = sweeps.sweep_command(sweep_args(path, "--collect-only"), never)
    assert "0 of 1 runs finished" in markdown and (out / "results.csv").is_file()


def test_overrides_grid_seeds_and_launcher_make_the_commands(tmp_path):
    path = write_sweep(
        tmp_path / "s.yaml", script="pretrain_id", base={"repeat-bias": True, "lr": "1e-3"},
        grid={"batch_size": [32, 64]},
        runs=[{"name": "plain"},
              {"name": "nobias", "repeat_bias": False, "decay_epochs": [3, 4], "seeds": [7]},
              {"script": "pretrain_text", "item_head": "moe", "lr": None}],
        seeds=[0, 1], launcher="accelerate", launch_args=["--num_processes", 1])
    sweep = sweeps.load_sweep(path)
    assert sweep.output_dir == Path("runs/sweeps/s")
    assert [(c.name, c.script, c.seeds) for c in sweep.combinations] == [
        ("plain,batch_size=32", "pretrain_id", (0, 1)),
        ("plain,batch_size=64", "pretrain_id", (0, 1)),
        ("nobias,batch_size=32", "pretrain_id", (7,)),
        ("nobias,batch_size=64", "pretrain_id", (7,)),
        ("item_head=moe,lr=,batch_size=32", "pretrain_text", (0, 1)),
        ("item_head=moe,lr=,batch_size=64", "pretrain_text", (0, 1))]
    plain, nobias, text = (sweep.combinations[i].argv for i in (0, 2, 4))
    assert plain == ("--repeat-bias", "--lr", "1e-3", "--batch-size", "32")
    assert nobias == ("--no-repeat-bias", "--lr", "1e-3", "--decay-epochs", "3", "4",
                      "--batch-size", "32")
    assert text == ("--repeat-bias", "--item-head", "moe", "--batch-size", "32")
    run = sweep.runs()[0]
    assert sweep.command(run) == [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        str(ROOT / "scripts" / "pretrain_id.py"), *plain,
        "--output-dir", str(Path("runs/sweeps/s/plain,batch_size=32/seed0")), "--seed", "0"]


BAD = {
    "unknown key": ({"script": "pretrain_id", "grids": {}},
                    "grids: unknown key; a sweep file has script, output_dir, base"),
    "unknown script": ({"script": "pretrain_nothing"},
                       "script: unknown script 'pretrain_nothing'; scripts/ has "),
    "unknown script in a run": ({"script": "pretrain_id", "runs": [{"script": "nope"}]},
                                "runs[0].script: unknown script 'nope'"),
    "unknown flag": ({"script": "pretrain_id", "base": {"epochz": 2}},
                     "base.epochz: scripts/pretrain_id.py has no flag --epochz; did you mean "
                     "epochs?"),
    "wrong type": ({"script": "pretrain_id", "base": {"epochs": "abc"}},
                   "base.epochs: invalid int value: 'abc' (--epochs)"),
    "wrong type in the grid": ({"script": "pretrain_id", "grid": {"lr": [1e-3, "fast"]}},
                               "grid.lr[1]: invalid float value: 'fast' (--lr)"),
    "wrong choice in a run": ({"script": "pretrain_text", "runs": [{"item_head": "big"}]},
                              "runs[0].item_head: invalid choice: 'big'"),
    "a value to a switch": ({"script": "pretrain_id", "base": {"repeat_bias": 3}},
                            "base.repeat_bias: --repeat-bias is a switch: true or false, not 3"),
    "a YAML boolean as a value": ({"script": "pretrain_id", "base": {"mixed_precision": False}},
                                  "base.mixed_precision: --mixed-precision takes a value, not "
                                  "false"),
    "seeds not a list": ({"script": "pretrain_id", "seeds": 3},
                         "seeds: a non-empty list of integers, not 3"),
    "a flag the sweep sets": ({"script": "pretrain_id", "base": {"seed": 1}},
                              "base.seed: set by the sweep"),
    "a required flag missing": ({"script": "finetune_full"},
                                "base: the following arguments are required: --pretrained"),
    "a script without a run folder": ({"script": "evaluate", "base": {"run": "x"}},
                                      "script: scripts/evaluate.py has no --output-dir, --resume"),
    "the script's own check": ({"script": "pretrain_id", "runs": [{"name": "a",
                                                                   "schedule": "cosine"}]},
                               "runs[0] ('a'): --schedule: DiffRec settings"),
    "launch_args without accelerate": ({"script": "pretrain_id", "launch_args": ["--cpu"]},
                                       "launch_args: only with launcher: accelerate"),
    "a bad launch argument": ({"script": "pretrain_id", "launcher": "accelerate",
                               "launch_args": ["--no-such-option"]},
                              "launch_args: accelerate launch: unrecognized arguments"),
    "a name that is no folder": ({"script": "pretrain_id", "runs": [{"name": "a/../b"}]},
                                 "runs[0].name: 'a/../b' is not a folder name"),
    "a name twice": ({"script": "pretrain_id", "runs": [{"name": "a"}, {"name": "a"}]},
                     "runs[1]: the combination 'a' comes twice (runs[0] too)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sweep_file_fails_before_anything_runs_naming_the_key(case, tmp_path, capsys,
                                                                    monkeypatch):
    spec, message = BAD[case]
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "bad.yaml", output_dir=str(out), **spec)
    monkeypatch.setattr(sweeps, "run_command", lambda command: pytest.fail(f"ran {command}"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda argv: sweeps.sweep_command(sweep_args(path)), [])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path}: {message}")
    assert captured.err.count("\n") == 1
    assert not out.exists()


def test_the_script_exits_2_with_one_line(tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", script="pretrain_id", base={"epochs": "abc"},
                       output_dir=str(tmp_path / "out"))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {path}: base.epochs: invalid int value: 'abc' (--epochs)\n"
    assert not (tmp_path / "out").exists()


def test_script_parser_is_the_scripts_own():
    from peftrec.downstream.cli import finetune_parser
    from peftrec.pretraining.cli import pretrain_parser

    def options(parser):
        return sorted(parser._option_string_actions)

    assert options(sweeps.script_parser("pretrain_text")) == options(pretrain_parser("", "text"))
    assert options(sweeps.script_parser("adapter_lora")) == options(finetune_parser("", ("lora",)))


# The results files the shipped sweeps reproduce.
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = sorted((ROOT / "benchmarks" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates(path):
    sweep = sweeps.load_sweep(path)
    assert sweep.combinations and sweep.output_dir.parts[:2] == ("runs", "sweeps")


def test_the_shipped_sweeps_reproduce_the_results_tables():
    # In-domain ML-1M: every row of the table, with the flags its command gave every run.
    in_domain = sweeps.load_sweep(ROOT / "benchmarks" / "sweeps" / "in-domain-ml-1m.yaml")
    names = {c.name: c for c in in_domain.combinations}
    recorded = json.loads((RESULTS / "in-domain" / "ml-1m.json").read_text())
    rows = [row["model"] for row in recorded["rows"] if row["model"] != "popularity"]
    assert rows and {row.replace(" ", "-") for row in rows} <= set(names)
    for combination in in_domain.combinations:
        argv = " ".join(combination.argv)
        assert " ".join(recorded["extra_flags"]) in argv
        assert "--epochs 10 --patience 10" in argv and "--dataset ml-1m" in argv
        assert combination.seeds == (0, 1, 2)
    # ML-1M -> ML-100k: every row (source and method), with its seeds, from those sources.
    transfer = sweeps.load_sweep(
        ROOT / "benchmarks" / "sweeps" / "transfer-ml-1m-to-ml-100k.yaml")
    recorded = json.loads((RESULTS / "transfer" / "ml-1m-to-ml-100k.json").read_text())
    # Named SOURCE/ROW as benchmarks/transfer.py names its folders, which it summarises.
    expected = {
        f"{row['source']}/" + row["method"].replace(" ", "-").replace(",", ""): row["seeds"]
        for row in recorded["rows"] if row["method"] != "popularity"}
    assert {c.name: len(c.seeds) for c in transfer.combinations} == expected
    sources = {"id": in_domain.output_dir / "id-lr-2e-3" / "seed0",
               "text": in_domain.output_dir / "text-linear-lr-2e-3" / "seed0",
               "text+id": in_domain.output_dir / "text+id-sum-lr-2e-3" / "seed0"}
    for combination in transfer.combinations:
        argv = " ".join(combination.argv)
        assert " ".join(recorded["extra_flags"]) in argv
        assert f"--pretrained {sources[combination.name.split('/')[0]]}" in argv
