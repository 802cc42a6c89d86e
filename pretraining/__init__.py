"""Sequence backbones, the Trainer and the full-ranking evaluator.

`SequentialRecommender` (item encoder + backbone + scorer) is what every script trains;
`Trainer` runs it under Accelerate; `evaluate` ranks the whole catalog.
"""

from peftrec.pretraining.diffrec import DiffRec, DiffRecConfig
from peftrec.pretraining.evaluation import (
    EvaluationProtocol,
    evaluate,
    ranking_metrics,
    target_ranks,
)
from peftrec.pretraining.recommender import (
    BACKBONES,
    CheckpointError,
    RecommenderConfig,
    SequentialRecommender,
    checkpoint_fingerprint,
)
from peftrec.pretraining.sasrec import SASRec, SASRecConfig
from peftrec.pretraining.schedules import SCHEDULES, build_schedule
from peftrec.pretraining.trainer import Trainer, TrainingConfig

__all__ = [
    "BACKBONES",
    "CheckpointError",
    "DiffRec",
    "DiffRecConfig",
    "EvaluationProtocol",
    "RecommenderConfig",
    "SCHEDULES",
    "SASRec",
    "SASRecConfig",
    "SequentialRecommender",
    "Trainer",
    "TrainingConfig",
    "build_schedule",
    "checkpoint_fingerprint",
    "evaluate",
    "ranking_metrics",
    "target_ranks",
]
