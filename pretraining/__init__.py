"""Sequence backbones, the Trainer and the full-ranking evaluator.

`SequentialRecommender` (item encoder + backbone + scorer) is what every script trains;
`Trainer` runs it under Accelerate; `evaluate` ranks the whole catalog.
"""

from pretraining.evaluation import EvaluationProtocol, evaluate, ranking_metrics, target_ranks
from pretraining.recommender import (
    BACKBONES,
    CheckpointError,
    RecommenderConfig,
    SequentialRecommender,
    checkpoint_fingerprint,
)
from pretraining.sasrec import SASRec, SASRecConfig
from pretraining.trainer import Trainer, TrainingConfig

__all__ = [
    "BACKBONES",
    "CheckpointError",
    "EvaluationProtocol",
    "RecommenderConfig",
    "SASRec",
    "SASRecConfig",
    "SequentialRecommender",
    "Trainer",
    "TrainingConfig",
    "checkpoint_fingerprint",
    "evaluate",
    "ranking_metrics",
    "target_ranks",
]
