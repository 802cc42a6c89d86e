"""Presets: named sets of settings for the pretraining scripts (`--preset NAME`).

A preset sits below a `--config` file and the command line, which override any of its
settings; the resolved values are what the run's config.json records. Settings are named
as their flags are. docs/user-guide.md#presets lists every preset's settings (a test
checks the table against this file).

`--backbone NAME` without `--preset` applies NAME's default preset (`DEFAULT_PRESETS`), so a
first run of a backbone trains with a recipe known to learn; `--preset none` opts out and
keeps the flags' own defaults. DreamRec's needs a SASRec run's item table (`needs`): it
learns nothing without one, so it refuses in one line rather than waste the run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    description: str
    settings: dict  # flag name (without --) -> value
    needs: tuple[str, ...] = ()  # flags the user must still give (a run folder, ...)
    needs_why: str = ""  # what they are for, said when one is missing


NO_PRESET = "none"  # --preset none: the flags' own defaults, no backbone default

PRESETS: dict[str, Preset] = {
    "sasrec-default": Preset(
        description="what --backbone sasrec (the default backbone) trains unless --preset is "
        "given: the repeat bias, and every window of a history instead of its last one "
        "(chosen on validation NDCG@10: docs/default-presets.md#sasrec)",
        settings={"backbone": "sasrec", "repeat-bias": True, "train-windows": "all"},
    ),
    "diffrec-default": Preset(
        description="what --backbone diffrec trains unless --preset is given: the causal "
        "denoiser trained on every position's next item of every window (~50 targets per "
        "window, not one), with the repeat bias, in batches of 64 (4x the steps of 256, which "
        "stayed at popularity level: docs/default-presets.md); the item table trains from "
        "the start (no SASRec run needed)",
        settings={
            "backbone": "diffrec", "causal-denoiser": True, "every-position": True,
            "repeat-bias": True, "max-len": 50, "train-windows": "all", "batch-size": 64,
            "lr": 2e-3,
        },
    ),
    "diffurec-default": Preset(
        description="what --backbone diffurec trains unless --preset is given: the "
        "reference's sample construction (every prefix of the last 50 items a sample)",
        settings={"backbone": "diffurec", "max-len": 50, "train-windows": "prefixes"},
    ),
    "adrec-default": Preset(
        description="what --backbone adrec trains unless --preset is given: every 50-item "
        "window of a history (ADRec learns every position's next item)",
        settings={"backbone": "adrec", "max-len": 50, "train-windows": "all"},
    ),
    "dreamrec-default": Preset(
        description="what --backbone dreamrec trains unless --preset is given: the "
        "reference's sample construction (every prefix of the last 50 items a sample), the "
        "item table copied from a SASRec run and frozen for 200 epochs (the whole run at the "
        "default --epochs): DreamRec's MSE alone collapses a trained table "
        "(docs/default-presets.md)",
        settings={"backbone": "dreamrec", "max-len": 50, "train-windows": "prefixes",
                  "freeze-items-epochs": 200},
        needs=("--init-items-from",),
        needs_why="DreamRec's MSE alone pulls a trained item table to one vector (ML-100k: "
        "validation NDCG@10 0 after two epochs; docs/default-presets.md), so the preset "
        "freezes a SASRec run's table: give that run folder, same dataset and --hidden-size "
        "(scripts/pretrain_id.py --backbone sasrec)",
    ),
    "dimerec-default": Preset(
        description="what --backbone dimerec trains unless --preset is given: every prefix "
        "of the last 50 items a sample, as DreamRec's and DiffuRec's (DimeRec learns one "
        "target per sample)",
        settings={"backbone": "dimerec", "max-len": 50, "train-windows": "prefixes"},
    ),
    "diffrec-plus": Preset(
        description="the best DiffRec recipe found here (ML-1M, test NDCG@10 0.1882 in "
        "docs/results-history.md): causal denoiser, every position its own step, repeat "
        "bias, the item table copied from a SASRec run and frozen until the rate has "
        "decayed, an untied output table",
        settings={
            "backbone": "diffrec", "causal-denoiser": True, "every-position": True,
            "repeat-bias": True, "untied-output": True, "freeze-items-epochs": 31,
            "hidden-size": 256, "ffn-size": 1024, "max-len": 50, "dropout": 0.2,
            "train-windows": "all", "batch-size": 128, "lr": 2e-3, "patience": 10,
            "scheduler": "step", "decay-epochs": [23, 28], "decay-factor": 0.25,
        },
        needs=("--init-items-from",),
        needs_why="the item table is copied from a SASRec run folder of the same dataset "
        "with --hidden-size 256 (scripts/pretrain_id.py --hidden-size 256 --ffn-size 1024 "
        "--max-len 50)",
    ),
    "diffrec-paper": Preset(
        description="DiffRec as the paper trains it (Du et al. 2023, section 5.1.4; "
        "shared/papers/diffrec-paper.md): bidirectional denoiser, separate output layer, "
        "every prefix a training sample, the MSE as a squared norm",
        settings={
            "backbone": "diffrec", "causal-denoiser": False, "untied-output": True,
            "schedule": "sqrt", "diffusion-steps": 1000, "mse-reduction": "sum",
            "hidden-size": 256, "ffn-size": 1024, "num-layers": 2, "num-heads": 2,
            "max-len": 50, "dropout": 0.2, "train-windows": "prefixes", "batch-size": 256,
            "lr": 1e-3, "weight-decay": 0.0, "epochs": 50, "patience": 50,
        },
    ),
}

# --backbone NAME -> the preset it trains with when no --preset is given.
DEFAULT_PRESETS: dict[str, str] = {
    "sasrec": "sasrec-default", "diffrec": "diffrec-default", "diffurec": "diffurec-default",
    "adrec": "adrec-default", "dreamrec": "dreamrec-default", "dimerec": "dimerec-default",
}
