"""benchmarks/vs_recbole.py: its timed logs and how it summarises them (fixture logs; no
RecBole is installed or run)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import load_benchmark

vs = load_benchmark("vs_recbole")


def event(name: str, **fields) -> str:
    return vs.EVENT + json.dumps({"event": name, **fields})


def valid(ndcg: float) -> dict:
    return {"hit@10": 2 * ndcg, "ndcg@10": ndcg, "mrr@10": ndcg / 2}


# What the RecBole worker's run leaves in output.log: RecBole's own logging between the
# worker's JSON lines, each line stamped with wall and CPU seconds.
RECBOLE_LOG = "\n".join([
    "4.100\t3.90\tSat 05 Dec 2026 04:04:58 INFO  [Training]: train_batch_size = [256]",
    "6.000\t5.80\t" + event("setup", anomaly_detection=False, torch_threads=2, users=943,
                            items=1682, interactions=100000),
    "60.000\t100.00\tepoch 0 training [time: 50.00s, train loss: 700.1]",
    "70.000\t110.00\t" + event("valid", epoch=1, metrics=valid(0.03)),
    "140.000\t230.00\t" + event("valid", epoch=2, metrics=valid(0.06)),
    "210.000\t350.00\t" + event("valid", epoch=3, metrics=valid(0.05)),
    "215.000\t355.00\t" + event("test", metrics={"hit@10": 0.11, "ndcg@10": 0.055}),
])


def peftrec_run(ndcgs: list[float], test_ndcg: float) -> tuple[str, list[dict], dict]:
    """A peftrec run's output.log, log.jsonl rows and metrics.json, an epoch every 10 s."""
    lines = ["2.000\t1.50\tdataset: 943 users"]
    for epoch, ndcg in enumerate(ndcgs, start=1):
        lines.append(f"{10.0 * epoch:.3f}\t{15.0 * epoch:.2f}\tepoch {epoch}: loss 7.0  "
                     f"valid ndcg@10 {ndcg:.4f}  (best ...)  9.0s")
    rows = [{"epoch": e, "valid": {"ndcg@10": n, "hr@10": 2 * n}}
            for e, n in enumerate(ndcgs, start=1)]
    return "\n".join(lines), rows, {"test": {"ndcg@10": test_ndcg, "hr@10": 2 * test_ndcg}}


def with_run(summary: dict, settings: str) -> dict:
    return {**summary, "settings": settings, "load": {"start": 7.5, "end": 9.0}}


def test_recbole_summary_reads_the_worker_lines_only():
    summary = vs.recbole_summary(RECBOLE_LOG)
    assert summary["setup"]["anomaly_detection"] is False
    assert summary["setup"]["users"] == 943
    assert [(e["epoch"], e["seconds"], e["cpu_seconds"]) for e in summary["epochs"]] == [
        (1, 70.0, 110.0), (2, 140.0, 230.0), (3, 210.0, 350.0)]
    # RecBole's hit@10 is peftrec's hr@10, so both systems' rows use one name.
    assert summary["epochs"][1]["valid"]["hr@10"] == pytest.approx(0.12)
    assert summary["test"] == {"hr@10": 0.11, "ndcg@10": 0.055}


def test_peftrec_summary_times_each_epoch_by_its_line():
    log, rows, metrics = peftrec_run([0.02, 0.04], 0.03)
    summary = vs.peftrec_summary(log, rows, metrics)
    assert [(e["epoch"], e["seconds"], e["cpu_seconds"], e["valid"]["ndcg@10"])
            for e in summary["epochs"]] == [(1, 10.0, 15.0, 0.02), (2, 20.0, 30.0, 0.04)]
    assert summary["test"]["ndcg@10"] == 0.03


def test_table_times_each_run_to_recbole_best_validation():
    recbole = with_run(vs.recbole_summary(RECBOLE_LOG), "its SASRec defaults, batch 256")
    fast = with_run(vs.peftrec_summary(*peftrec_run([0.05, 0.065, 0.07], 0.06)), "-")
    slow = with_run(vs.peftrec_summary(*peftrec_run([0.02, 0.04], 0.03)), "--repeat-bias")
    rows = vs.table_rows(recbole, {"defaults": fast, "repeat bias": slow})

    assert [r["system"] for r in rows] == ["RecBole", "peftrec defaults", "peftrec repeat bias"]
    # RecBole's best validation is epoch 2 (0.06, at 140 s wall, 230 s CPU): its own ratio is 1.
    assert rows[0]["best valid ndcg@10"] == 0.06 and rows[0]["best epoch"] == 2
    assert rows[0][vs.RATIO] == 1.0 and rows[0][vs.CPU_RATIO] == 1.0
    # peftrec first passes 0.06 at epoch 2: 20 s wall, 30 s CPU.
    assert rows[1][vs.TO_BEST] == 20.0 and rows[1][vs.RATIO] == pytest.approx(20 / 140)
    assert rows[1][vs.CPU_RATIO] == pytest.approx(30 / 230)
    assert rows[1]["best epoch"] == 3 and rows[1]["total s"] == 30.0
    assert rows[2][vs.TO_BEST] is None and rows[2][vs.RATIO] is None

    lines = vs.target_lines(rows)
    assert "after 20 s = 0.143x RecBole's 140 s -> NOT met" in lines[0]
    assert "test NDCG@10 0.0600 vs RecBole's 0.0550 -> met" in lines[0]
    assert "never reached RecBole's best validation NDCG@10 (0.0600) -> NOT met" in lines[1]
    assert "test NDCG@10 0.0300 vs RecBole's 0.0550 -> NOT met" in lines[1]

    text = vs.report(rows, recbole["setup"], {"users": 943, "order_differs": 83,
                                              "targets_differ": 5})
    assert "anomaly detection off" in text and "943 users, 1,682 items" in text
    assert "83 of 943 users' sequences are ordered differently" in text
    assert "| not reached |" in text


def test_a_ratio_within_the_target_is_met():
    recbole = with_run(vs.recbole_summary(RECBOLE_LOG), "")
    quick = with_run(vs.peftrec_summary(*peftrec_run([0.06], 0.06)), "-")
    quick["epochs"][0]["seconds"] = 7.0  # 0.05x RecBole's 140 s
    (line,) = vs.target_lines(vs.table_rows(recbole, {"defaults": quick}))
    assert "0.050x RecBole's 140 s -> met" in line


def test_order_differences_replays_recbole_float32_timestamps(tmp_path):
    # Over a 1e9 s span float32 cannot tell 900000000 from 900000001: RecBole keeps the
    # file order of such a pair, peftrec the exact one.
    rows = [("a", "i0", 0), ("a", "i2", 900_000_001), ("a", "i1", 900_000_000),
            ("b", "i3", 1_000_000_000),
            ("c", "i5", 500_000_001), ("c", "i4", 500_000_000), ("c", "i6", 700_000_000),
            ("c", "i7", 800_000_000)]
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     + "".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in rows))
    # a's validation and test targets swap; c's order differs before its targets only.
    assert vs.order_differences(inter) == {"users": 3, "order_differs": 2, "targets_differ": 1}


def test_both_systems_get_one_shape_and_protocol(tmp_path):
    from peftrec.pretraining.cli import parse_args, pretrain_parser

    settings = vs.recbole_settings(tmp_path, seed=3, batch_size=256)
    peftrec = parse_args(pretrain_parser(""), vs.PEFTREC_SHAPE)
    assert (settings["MAX_ITEM_LIST_LENGTH"], settings["hidden_size"], settings["inner_size"],
            settings["n_layers"], settings["n_heads"]) == (
        peftrec.max_len, peftrec.hidden_size, peftrec.ffn_size, peftrec.num_layers,
        peftrec.num_heads)
    assert settings["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO",
                                     "mode": "full", "group_by": "user"}
    assert settings["valid_metric"] == "NDCG@10" and settings["stopping_step"] == peftrec.patience
    assert not peftrec.mask_history


def test_run_timed_stamps_every_line_and_marks_the_end(tmp_path):
    script = "import os; print('a'); print(os.environ['OMP_NUM_THREADS'])"
    vs.run_timed([sys.executable, "-c", script], tmp_path / "run", threads=3)
    lines = vs.timed_lines((tmp_path / "run" / "output.log").read_text())
    assert [text for _, _, text in lines] == ["a", "3"]
    assert all(wall >= 0 and cpu >= 0 for wall, cpu, _ in lines)
    assert vs.finished(tmp_path / "run")


def test_a_failed_run_is_one_line_and_not_finished(tmp_path):
    with pytest.raises(SystemExit, match=r"failed \(exit 3\); its output is in .*output.log"):
        vs.run_timed([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "run",
                     threads=1)
    assert not vs.finished(tmp_path / "run")


def test_summary_only_without_a_recbole_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vs_recbole.py", "--summary-only",
                                      "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no finished RecBole run .* run without --summary-only"):
        vs.main()
