"""Sequence backbones, the Trainer and the full-ranking evaluator.

`SequentialRecommender` (item encoder + backbone + scorer) is what every script trains;
`Trainer` runs it under Accelerate; `evaluate` ranks the whole catalog.
"""

from pretraining.diffrec import DiffRec, DiffRecConfig
from pretraining.evaluation import EvaluationProtocol, evaluate, ranking_metrics, target_ranks
from pretraining.recommender import (
    BACKBONES,
    CheckpointError,
    RecommenderConfig,
    SequentialRecommender,
    checkpoint_fingerprint,
)
from pretraining.sasrec import SASRec, SASRecConfig
from pretraining.schedules import SCHEDULES, build_schedule
from pretraining.trainer import Trainer, TrainingConfig

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
