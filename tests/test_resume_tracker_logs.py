"""After a kill and --resume, the trackers (here MLflow, on a local file store) hold each
epoch once, with the numbers of log.jsonl, as a run never interrupted would (issue 23)."""

import json

import pytest

from peftrec.pretraining.trainer import Trainer
from tests.helpers import run_pretrain


class Killed(Exception):
    """Stands for the SIGKILL: the run stops where it is, nothing after runs."""


@pytest.mark.parametrize("kill", ["before the state save", "after the state save"])
def test_a_resumed_run_logs_each_epoch_once(kill, tiny_dataset_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    save_state, saves = Trainer._save_state, []

    def killed_at_the_second_save(self):
        saves.append(1)
        if len(saves) == 2 and kill.startswith("before"):
            raise Killed
        save_state(self)
        if len(saves) == 2:
            raise Killed

    monkeypatch.setattr(Trainer, "_save_state", killed_at_the_second_save)
    run = tmp_path / "run"
    flags = ["--epochs", "2", "--report-to", "mlflow"]
    with pytest.raises(Killed):
        run_pretrain(tiny_dataset_dir, run, *flags)
    mlflow.end_run()  # a killed process's run ends with it
    run_pretrain(tiny_dataset_dir, run, *flags, "--resume")

    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("peftrec")
    logged = sorted((point.step, point.value)
                    for tracked in client.search_runs([experiment.experiment_id])
                    for point in client.get_metric_history(tracked.info.run_id,
                                                           "valid/ndcg_at_10"))
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [(row["epoch"], row["valid"]["ndcg@10"]) for row in rows]
    assert [step for step, _ in logged] == [1, 2]
