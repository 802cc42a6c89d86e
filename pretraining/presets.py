"""Presets: named sets of settings for the pretraining scripts (`--preset NAME`).

A preset sits below a `--config` file and the command line, which override any of its
settings; the resolved values are what the run's config.json records. Settings are named
as their flags are. docs/user-guide.md#presets lists every preset's settings (a test
checks the table against this file).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    description: str
    settings: dict  # flag name (without --) -> value
    needs: tuple[str, ...] = ()  # flags the user must still give (a run folder, ...)
    needs_why: str = ""  # what they are for, said when one is missing


PRESETS: dict[str, Preset] = {
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
