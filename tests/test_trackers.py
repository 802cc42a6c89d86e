"""`--report-to`: which Accelerate trackers a run logs to (TensorBoard, MLflow)."""

from __future__ import annotations

import re

import pytest

from peftrec.pretraining import trainer
from tests.helpers import run_pretrain


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly the trackers named in the returned set are installed (and no MLflow
    store is configured)."""
    available: set[str] = set()
    import accelerate.utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available",
                        lambda: "tensorboard" in available)
    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: "mlflow" in available)
    return available


def test_auto_logs_to_the_installed_trackers_and_none_to_none(installed, monkeypatch):
    assert trainer._trackers("auto") == []
    installed.add("mlflow")
    assert trainer._trackers("auto") == []  # no store named: mlflow would write to the cwd
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert trainer._trackers("auto") == ["mlflow"]
    installed.add("tensorboard")
    assert trainer._trackers("auto") == ["tensorboard", "mlflow"]
    assert trainer._trackers("none") == []
    assert trainer._trackers("mlflow") == ["mlflow"]
    assert trainer._trackers(" tensorboard , mlflow ") == ["tensorboard", "mlflow"]


@pytest.mark.parametrize("report_to, installs, message", [
    ("wandb", {"tensorboard"}, "unknown tracker 'wandb' in --report-to; use ['mlflow', "
     "'tensorboard']"),
    ("tensorboard,mlflow", {"tensorboard"},
     "--report-to mlflow: mlflow is not installed (pip install -e '.[tracking]')"),
    ("mlflow", {"mlflow"}, "--report-to mlflow: set MLFLOW_TRACKING_URI to your MLflow store"),
])
def test_an_unknown_missing_or_storeless_tracker_is_named(installed, report_to, installs,
                                                          message):
    installed.update(installs)
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer._trackers(report_to)


def test_a_run_logs_its_metrics_to_a_local_mlflow_store(tiny_dataset_dir, tmp_path, monkeypatch):
    """SRT's tracker, on a local file store (skipped where mlflow is not installed)."""
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    # MLflow 3 keeps its file store for those who ask; a SQL store takes seconds to create.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_pretrain(tiny_dataset_dir, tmp_path / "run", "--epochs", "2", "--report-to", "mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("peftrec")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")
    assert len(history) == 2 and all(0.0 <= point.value <= 1.0 for point in history)
    assert run.data.params["epochs"] == "2"
