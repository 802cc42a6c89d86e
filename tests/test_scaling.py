"""benchmarks/scaling.py's own logic: the power-law fit, the grid and the command lines of
its dry run (it trains nothing here)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def test_the_power_law_fit_recovers_a_known_exponent():
    x = np.geomspace(1e4, 1e7, 6)
    exact = scaling.power_law_fit(list(x), list(0.02 * x ** 0.12))
    assert exact["exponent"] == pytest.approx(0.12)
    assert exact["prefactor"] == pytest.approx(0.02)
    assert exact["r2"] == pytest.approx(1.0) and exact["points"] == 6
    # Multiplicative noise: the exponent within noise, the fit no longer perfect.
    noise = np.exp(np.random.default_rng(0).normal(0, 0.02, len(x)))
    noisy = scaling.power_law_fit(list(x), list(0.02 * x ** 0.12 * noise))
    assert noisy["exponent"] == pytest.approx(0.12, abs=0.02) and 0.9 < noisy["r2"] < 1


@pytest.mark.parametrize("x, y", [([1e5], [0.1]), ([1e5, 1e5], [0.1, 0.2]),
                                  ([1e5, 1e6], [0.1, 0.0])])
def test_no_fit_without_two_distinct_positive_points(x, y):
    assert scaling.power_law_fit(x, y) is None


@pytest.mark.parametrize("spec, parsed, label", [
    ("ml-1m:0.1", ("ml-1m", 0.1), "ml-1m-10%"), ("ml-1m:1", ("ml-1m", 1.0), "ml-1m-100%"),
    ("synthetic:10000000", ("synthetic", 10_000_000), "synthetic-10M"),
    ("synthetic:20000", ("synthetic", 20_000), "synthetic-20k"),
])
def test_data_specs(spec, parsed, label):
    assert scaling.parse_data(spec) == parsed and scaling.data_label(spec) == label


@pytest.mark.parametrize("spec", ["ml-1m:0", "ml-1m:1.5", "ml-1m", "synthetic:1.5",
                                  "amazon:0.1"])
def test_a_bad_data_spec_is_one_line_naming_the_forms(spec, capsys):
    with pytest.raises(SystemExit):
        scaling.main(["--data", spec, "--dry-run"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--data {spec!r}: use ml-1m:SHARE" in error and "synthetic:N" in error


def dry_run(capsys, *argv: str) -> list[list[str]]:
    scaling.main(["--dry-run", *argv])
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()
            if not line.startswith("#")]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_dry_run_covers_the_grid(capsys, tmp_path):
    commands = dry_run(capsys, "--data", "ml-1m:0.1", "ml-1m:1", "synthetic:1000000",
                       "--widths", "64", "128", "--depths", "1", "2", "--base-data", "ml-1m:1",
                       "--base-width", "64", "--base-depth", "2", "--seeds", "0", "1",
                       "--output-dir", str(tmp_path), "--", "--eval-users", "100")
    pretrain = [c for c in commands if c[1].endswith("pretrain_id.py")]
    finetune = [c for c in commands if not c[1].endswith("pretrain_id.py")]
    # 3 data sizes at w64-d2 and 2 x 2 model sizes on ML-1M (w64-d2 on ML-1M in both): 6.
    points = {(flag(c, "--dataset"), flag(c, "--hidden-size"), flag(c, "--num-layers"))
              for c in pretrain}
    subset, synthetic = str(tmp_path / "data" / "ml-1m-10%"), str(
        tmp_path / "data" / "synthetic-1M")
    assert points == {(subset, "64", "2"), ("ml-1m", "64", "2"), (synthetic, "64", "2"),
                      ("ml-1m", "64", "1"), ("ml-1m", "128", "1"), ("ml-1m", "128", "2")}
    assert len(pretrain) == 6 * 2  # every seed
    assert all(flag(c, "--ffn-size") == str(4 * int(flag(c, "--hidden-size"))) and
               flag(c, "--eval-users") == "100" for c in pretrain)
    # Progressive and the adapter after every pretraining run; from scratch once per size.
    by_strategy = {name: [c for c in finetune if all(f in c for f in flags)
                          and Path(c[1]).stem == script]
                   for name, script, flags in scaling.STRATEGIES}
    assert len(by_strategy["progressive"]) == len(by_strategy["adapter"]) == 12
    assert len(by_strategy["scratch"]) == 4 * 2
    pretrained = {flag(c, "--output-dir") for c in pretrain}
    assert {flag(c, "--pretrained") for c in finetune} <= pretrained
    assert {flag(c, "--pretrained") for c in by_strategy["adapter"]} == pretrained
    assert all(flag(c, "--dataset") == "ml-100k" for c in finetune)
    assert len({flag(c, "--output-dir") for c in commands}) == len(commands)


def test_a_cross_model_grid_varies_one_of_width_and_depth_at_a_time():
    points = scaling.grid(["ml-1m:0.1"], [64, 128, 256], [1, 2, 4], "ml-1m:1", 64, 2, "cross")
    assert [(p.data, p.width, p.depth) for p in points] == [
        ("ml-1m:0.1", 64, 2), ("ml-1m:1", 64, 2), ("ml-1m:1", 128, 2), ("ml-1m:1", 256, 2),
        ("ml-1m:1", 64, 1), ("ml-1m:1", 64, 4)]


def test_every_run_folder_is_under_the_output_dir(capsys, tmp_path):
    commands = dry_run(capsys, "--data", "ml-1m:0.3", "--widths", "32", "--depths", "1",
                       "--base-data", "ml-1m:0.3", "--seeds", "0", "--output-dir",
                       str(tmp_path))
    assert all(Path(flag(c, "--output-dir")).is_relative_to(tmp_path) for c in commands)
    assert not any(tmp_path.iterdir())  # a dry run prepares and trains nothing


def test_fits_follow_each_axis():
    args = argparse.Namespace(base_data="ml-1m:1", base_width=64, base_depth=2)

    def row(spec, width, depth, strategy, interactions, params, ndcg):
        return {"spec": spec, "width": width, "depth": depth, "strategy": strategy,
                "pretrain interactions": interactions, "non-embedding params": params,
                "ndcg": [ndcg]}

    rows = [row("ml-1m:0.1", 64, 2, "progressive", 1e5, 1e5, 0.05),
            row("ml-1m:1", 64, 2, "progressive", 1e6, 1e5, 0.05 * 10 ** 0.2),
            row("ml-1m:1", 128, 2, "progressive", 1e6, 4e5, 0.05 * 10 ** 0.2 * 4 ** 0.1),
            row("ml-1m:1", 64, 2, "scratch", 1e6, 1e5, 0.04),
            row("ml-1m:1", 128, 2, "scratch", 1e6, 4e5, 0.04 * 4 ** 0.05)]
    curves = {(c["strategy"], c["axis"]): c for c in scaling.fits(rows, args)}
    assert set(curves) == {("progressive", "data"), ("progressive", "model"),
                           ("scratch", "model")}  # from scratch has no data axis
    assert math.isclose(curves["progressive", "data"]["exponent"], 0.2)
    assert math.isclose(curves["progressive", "model"]["exponent"], 0.1)
    assert math.isclose(curves["scratch", "model"]["exponent"], 0.05)


def test_a_failed_run_stops_the_study_with_one_line_naming_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(SystemExit, match=r"failed \(exit 3\): see .*seed0\.log; rerun"):
        scaling.run(command, tmp_path / "run" / "seed0")
    assert "boom" in (tmp_path / "run" / "seed0.log").read_text()


def test_a_failure_drops_the_runs_not_yet_started(tmp_path):
    fail = [sys.executable, "-c", "raise SystemExit(1)"]
    succeed = [sys.executable, "-c", "pass"]
    with pytest.raises(SystemExit, match="failed"):
        scaling.run_all([(fail, tmp_path / "a" / "seed0"), (succeed, tmp_path / "b" / "seed0")],
                        jobs=1)
    assert not (tmp_path / "b").exists()
