"""Fine-tuning a pretrained recommender on a target domain.

    finetune(args, HoulsbyConfig(layers="top:1"), "houlsby")   # what the scripts run

`downstream.transfer` rebuilds the item side for the target catalog, injects adapters
(or trains everything, or trains from scratch, or evaluates zero-shot), fine-tunes with
`pretraining.Trainer` and evaluates by the same full-ranking protocol; `downstream.cli`
holds the scripts' flags. `downstream.serving` recommends from any run folder:

    load_run("runs/ml-100k-sasrec").recommend([["Star Wars (1977)", "Fargo (1996)"]], k=10)
"""

from peftrec.downstream.serving import RunRecommender, load_run
from peftrec.downstream.transfer import (
    BASELINES,
    adapt,
    build_target_model,
    evaluate_any_run,
    finetune,
    load_adapted_model,
    load_any_checkpoint,
    target_config,
    transfer_weights,
)

__all__ = [
    "BASELINES",
    "RunRecommender",
    "adapt",
    "build_target_model",
    "evaluate_any_run",
    "finetune",
    "load_adapted_model",
    "load_any_checkpoint",
    "load_run",
    "target_config",
    "transfer_weights",
]
