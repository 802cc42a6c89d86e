"""Peer benchmark: RecBole 1.2.1's SASRec against peftrec's, on the same interactions.

RecBole runs in its own virtual environment (`--recbole-venv`, created on first use from
the package index: it needs numpy 1.26, pandas < 2.3 and setuptools < 81, which peftrec's
venv does not have) on the ml-100k atomic file its wheel ships (943 users, 1,682 items,
100,000 ratings). peftrec prepares the same file without filtering (`--k-core 0 --dedupe
all`) and trains its SASRec on it, one run after the other, never two at once:

- the same model shape: 50 items of history, width 64, feed-forward 256, 2 layers, 2 heads;
- the same protocol: chronological leave-one-out, full ranking over the catalog, history
  not masked, the best epoch on validation NDCG@10 tested, patience 10 epochs. RecBole's
  config is `eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}` and
  `valid_metric: NDCG@10`; its full ranking of a sequential model masks nothing either;
- RecBole otherwise with its own SASRec settings (dropout 0.5 in attention and hidden
  layers, every prefix a training sample, cross-entropy over the catalog) and batch 256;
  peftrec with its defaults, plus rows with named options (`ROWS`).

RecBole's `sine.py` switches autograd anomaly detection on when it is imported, which slows
every RecBole model by about 40%; the RecBole worker (this file, run by the RecBole venv's
Python) replaces `torch.autograd.set_detect_anomaly` by a no-op before importing RecBole,
checks that detection is off and says so in its output.

Each run's output is logged with the wall time since its process started
(`<seconds>\\t<line>`), so both sides are timed the same way: process start, imports and
dataset loading included. The table gives each run's best validation NDCG@10, its test
NDCG@10 and HR@10, the wall time at which it first reached RecBole's best validation
NDCG@10 and that time as a multiple of RecBole's (to its own best), and the load average
(1 minute) at its start and end, since the machine may be shared. Finished runs are
summarised without training again; an interrupted run starts afresh (a timing must not
span a resume).

    python benchmarks/vs_recbole.py --results vs-recbole/ml-100k
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Standard library only (tables too): the RecBole venv's Python imports this file as the worker.
from tables import markdown, number

ROOT = Path(__file__).resolve().parents[1]
RECBOLE_REQUIREMENTS = ["recbole==1.2.1", "numpy==1.26.*", "pandas<2.3", "setuptools<81",
                        "torch==2.13.0"]  # an exact torch: the local CPU build
EVENT = "vs_recbole "  # starts each JSON line the RecBole worker prints
# One shape for both: RecBole's SASRec defaults, which peftrec's flags name differently.
SHAPE = {"max_len": 50, "hidden_size": 64, "ffn_size": 256, "num_layers": 2, "num_heads": 2}
PEFTREC_SHAPE = [flag for name, value in SHAPE.items()
                 for flag in (f"--{name.replace('_', '-')}", str(value))]
# peftrec's rows: (name, flags over its defaults, the preset sasrec-default: the repeat bias
# and every window of a history). Then each of the two taken away, both ("--preset none":
# the flags' own defaults, each user's last max_len items only), and RecBole's recipe.
# "lr 2e-3": the rate of the README's SASRec runs, twice the default.
ROWS = [
    ("defaults", []),
    ("lr 2e-3", ["--lr", "2e-3"]),
    ("no repeat bias", ["--no-repeat-bias"]),
    ("last window", ["--train-windows", "last"]),
    ("flag defaults", ["--preset", "none"]),
    ("RecBole's recipe", ["--preset", "none", "--train-windows", "prefixes", "--dropout", "0.5",
                          "--batch-size", "256"]),
]
RECBOLE = "RecBole"
# The time to RecBole's best validation NDCG@10, on the wall clock and in CPU seconds, and
# as a multiple of RecBole's own.
TO_BEST, RATIO = "s to RecBole's best valid", "x RecBole's time"
CPU_TO_BEST, CPU_RATIO = "CPU s to RecBole's best valid", "x RecBole's CPU time"
COLUMNS = ("system", "settings", "best valid ndcg@10", "best epoch", "test ndcg@10",
           "test hr@10", TO_BEST, RATIO, CPU_TO_BEST, CPU_RATIO, "total s", "load start",
           "load end")
TARGET_TIME_RATIO = 0.05  # peftrec's defaults reach RecBole's best validation in <= 5% of its time
PEFTREC_EPOCH = re.compile(r"^epoch (\d+): loss ")


# ----------------------------------------------------------------- the RecBole worker


def recbole_settings(data_path: Path, seed: int, batch_size: int) -> dict:
    """RecBole's config: its SASRec defaults, the shared shape and the shared protocol."""
    return {
        "data_path": str(data_path),
        "MAX_ITEM_LIST_LENGTH": SHAPE["max_len"],
        "hidden_size": SHAPE["hidden_size"],
        "inner_size": SHAPE["ffn_size"],
        "n_layers": SHAPE["num_layers"],
        "n_heads": SHAPE["num_heads"],
        "loss_type": "CE",
        "train_neg_sample_args": None,  # cross-entropy over the whole catalog
        "train_batch_size": batch_size,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full",
                      "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10],
        "valid_metric": "NDCG@10",  # RecBole's default is MRR@10; peftrec selects on NDCG@10
        "stopping_step": 10,
        "epochs": 300,
        "seed": seed,
        "use_gpu": False,
        "show_progress": False,
        "checkpoint_dir": "saved",  # under the worker's working directory, the run folder
    }


def emit(event: str, **fields) -> None:
    print(EVENT + json.dumps({"event": event, **fields}), flush=True)


def recbole_worker(settings: dict) -> None:
    """Train and test RecBole's SASRec with `settings` (run by the RecBole venv's Python),
    printing one JSON line per event: setup, each epoch's validation, the test."""
    import torch

    # recbole/model/sequential_recommender/sine.py calls set_detect_anomaly(True) at import.
    torch.autograd.set_detect_anomaly = lambda *args, **kwargs: None
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    class ReportingTrainer(Trainer):
        """RecBole's trainer, printing every validation it runs."""

        def _valid_epoch(self, valid_data, show_progress=False):
            score, result = super()._valid_epoch(valid_data, show_progress)
            self.validations = getattr(self, "validations", 0) + 1  # one per epoch
            emit("valid", epoch=self.validations, metrics=dict(result))
            return score, result

    config = Config(model="SASRec", dataset="ml-100k", config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    emit("setup", anomaly_detection=torch.is_anomaly_enabled(),
         torch_threads=torch.get_num_threads(), users=dataset.user_num - 1,
         items=dataset.item_num - 1, interactions=dataset.inter_num)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = ReportingTrainer(config, model)
    trainer.fit(train_data, valid_data, show_progress=False)
    emit("test", metrics=dict(trainer.evaluate(test_data, load_best_model=True)))


# ------------------------------------------------------------------ running, timed


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process `pid` has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_timed(command: list[str], run_dir: Path, threads: int,
              env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
    """Run `command` with `threads` torch threads, logging each output line to
    run_dir/output.log as '<wall seconds since launch>\t<CPU seconds the process has
    used>\t<line>' (and echoing it); run_dir/run.json (the command and the load average
    before and after) is written last, so it marks a finished run. CPU seconds are the
    fairer clock on a machine shared with other jobs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    with (open(run_dir / "output.log", "w") as log,
          subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                           "OMP_NUM_THREADS": str(threads), **(env or {})}
                           ) as process):
        for line in process.stdout:
            # Readable to the end: the process is reaped only when the with block waits.
            cpu = cpu_seconds(process.pid)
            log.write(f"{time.perf_counter() - started:.3f}\t{cpu:.2f}\t{line}")
            log.flush()
            print(line, end="", flush=True)
    if process.returncode:
        raise SystemExit(f"error: {command[0]} ... failed (exit {process.returncode}); its "
                         f"output is in {run_dir / 'output.log'}")
    record = {"command": command, "load_start": load_start, "load_end": os.getloadavg()[0]}
    (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def finished(run_dir: Path) -> bool:
    return (run_dir / "run.json").is_file()


def start_afresh(run_dir: Path) -> None:
    """Remove an interrupted run's folder: a timing must come from one uninterrupted run."""
    if run_dir.exists():
        print(f"{run_dir}: unfinished, starting it afresh")
        shutil.rmtree(run_dir)


def recbole_python(venv: Path) -> Path:
    """The Python of a venv holding RecBole 1.2.1, which is created and filled on first use."""
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"creating RecBole's venv in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([str(python), "-c", "import recbole; print(recbole.__version__)"],
                               capture_output=True, text=True).stdout.strip()
    if installed != "1.2.1":
        subprocess.run([str(python), "-m", "pip", "install", *RECBOLE_REQUIREMENTS], check=True)
    return python


def recbole_dataset_folder(venv: Path) -> Path:
    """The folder of RecBole's shipped example datasets (ml-100k/ml-100k.inter, ...)."""
    found = sorted(venv.glob("lib/python*/site-packages/recbole/dataset_example"))
    if not found:
        raise SystemExit(f"error: no recbole/dataset_example in {venv}; remove the folder so "
                         "that it is created afresh")
    return found[0]


def run_recbole(venv: Path, run_dir: Path, seed: int, batch_size: int, threads: int) -> None:
    python = recbole_python(venv)
    settings = recbole_settings(recbole_dataset_folder(venv), seed, batch_size)
    command = [str(python), str(Path(__file__).resolve()), "--recbole-worker",
               json.dumps(settings)]
    # RecBole's checkpoints are whole pickles, which torch >= 2.6 refuses to load by default.
    run_timed(command, run_dir, threads, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
              cwd=run_dir)


def prepare_peftrec_data(venv: Path, data_dir: Path) -> None:
    """RecBole's ml-100k interactions as a peftrec dataset folder, nothing filtered out."""
    if (data_dir / "dataset_info.json").is_file():
        return
    recbole_python(venv)  # the file comes with RecBole's wheel
    inter = recbole_dataset_folder(venv) / "ml-100k" / "ml-100k.inter"
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--input", str(inter),
                    "--format", "recbole", "--k-core", "0", "--dedupe", "all",
                    "--output", str(data_dir)], cwd=ROOT, check=True)


def run_peftrec(data_dir: Path, run_dir: Path, seed: int, flags: list[str], threads: int
                ) -> None:
    command = [sys.executable, "scripts/pretrain_id.py", "--dataset", str(data_dir.resolve()),
               "--output-dir", str((run_dir / "run").resolve()), *PEFTREC_SHAPE,
               "--seed", str(seed), "--cpu", "--report-to", "none", *flags]
    run_timed(command, run_dir, threads, env={"HF_HUB_OFFLINE": "1"})


# ---------------------------------------------------------------------- summarising


def timed_lines(log_text: str) -> list[tuple[float, float, str]]:
    """The (wall seconds since launch, CPU seconds, line) of each line of an output.log."""
    lines = []
    for line in log_text.splitlines():
        seconds, cpu, text = line.split("\t", 2)
        lines.append((float(seconds), float(cpu), text))
    return lines


def recbole_summary(log_text: str) -> dict:
    """Setup, epochs (number, seconds, validation metrics) and test metrics from the
    RecBole worker's output; RecBole's 'hit@10' is peftrec's 'hr@10'."""

    def renamed(metrics: dict) -> dict:
        return {key.replace("hit@", "hr@"): value for key, value in metrics.items()}

    summary = {"epochs": [], "test": None, "setup": None}
    for seconds, cpu, line in timed_lines(log_text):
        if not line.startswith(EVENT):
            continue
        event = json.loads(line[len(EVENT):])
        if event["event"] == "setup":
            summary["setup"] = {k: v for k, v in event.items() if k != "event"}
        elif event["event"] == "valid":
            summary["epochs"].append({"epoch": event["epoch"], "seconds": seconds,
                                      "cpu_seconds": cpu, "valid": renamed(event["metrics"])})
        elif event["event"] == "test":
            summary["test"] = renamed(event["metrics"])
    return summary


def peftrec_summary(log_text: str, log_rows: list[dict], metrics: dict) -> dict:
    """Epochs (number, seconds at which its 'epoch N: loss ...' line appeared, validation
    metrics from log.jsonl's rows) and test metrics from metrics.json."""
    valid = {row["epoch"]: row["valid"] for row in log_rows}
    epochs = []
    for seconds, cpu, line in timed_lines(log_text):
        match = PEFTREC_EPOCH.match(line)
        if match:
            epoch = int(match[1])
            epochs.append({"epoch": epoch, "seconds": seconds, "cpu_seconds": cpu,
                           "valid": valid[epoch]})
    return {"epochs": epochs, "test": metrics["test"]}


def best_epoch(epochs: list[dict]) -> dict:
    """The first epoch with the highest validation NDCG@10 (what both systems test)."""
    return max(epochs, key=lambda e: (e["valid"]["ndcg@10"], -e["epoch"]))


def first_reaching(epochs: list[dict], ndcg: float) -> dict | None:
    """The first epoch whose validation NDCG@10 reached `ndcg` (None: none did)."""
    return next((e for e in epochs if e["valid"]["ndcg@10"] >= ndcg), None)


def table_rows(recbole: dict, peftrec: dict[str, dict]) -> list[dict]:
    """One row per run: quality, and time to RecBole's best validation NDCG@10 (also as a
    multiple of RecBole's own time to it). A summary also carries 'settings' and 'load'."""
    recbole_best = best_epoch(recbole["epochs"])
    rows = []
    for system, summary in [(RECBOLE, recbole), *peftrec.items()]:
        best = best_epoch(summary["epochs"])
        reached = first_reaching(summary["epochs"], recbole_best["valid"]["ndcg@10"])
        wall, cpu = (reached["seconds"], reached["cpu_seconds"]) if reached else (None, None)
        rows.append({
            "system": system if system == RECBOLE else f"peftrec {system}",
            "settings": summary["settings"],
            "best valid ndcg@10": best["valid"]["ndcg@10"],
            "best epoch": best["epoch"],
            "test ndcg@10": summary["test"]["ndcg@10"],
            "test hr@10": summary["test"]["hr@10"],
            TO_BEST: wall,
            RATIO: None if wall is None else wall / recbole_best["seconds"],
            CPU_TO_BEST: cpu,
            CPU_RATIO: None if cpu is None else cpu / recbole_best["cpu_seconds"],
            "total s": summary["epochs"][-1]["seconds"],
            "load start": summary["load"]["start"],
            "load end": summary["load"]["end"],
        })
    return rows


def target_lines(rows: list[dict]) -> list[str]:
    """The target, checked for each peftrec row (it is set for the defaults)."""
    recbole = rows[0]
    recbole_ndcg, recbole_seconds = recbole["best valid ndcg@10"], recbole[TO_BEST]
    lines = []
    for row in rows[1:]:
        ratio = row[RATIO]
        if ratio is None:
            speed = (f"never reached RecBole's best validation NDCG@10 ({recbole_ndcg:.4f}) "
                     f"-> NOT met (target <= {TARGET_TIME_RATIO}x)")
        else:
            speed = (f"reached RecBole's best validation NDCG@10 ({recbole_ndcg:.4f}) after "
                     f"{row[TO_BEST]:.0f} s = {ratio:.3f}x RecBole's {recbole_seconds:.0f} s -> "
                     f"{'met' if ratio <= TARGET_TIME_RATIO else 'NOT met'} "
                     f"(target <= {TARGET_TIME_RATIO}x; in CPU time {row[CPU_RATIO]:.3f}x)")
        better = row["test ndcg@10"] >= recbole["test ndcg@10"]
        quality = (f"test NDCG@10 {row['test ndcg@10']:.4f} vs RecBole's "
                   f"{recbole['test ndcg@10']:.4f} -> {'met' if better else 'NOT met'}")
        lines.append(f"- {row['system']}: {speed}; {quality} (target >=)")
    return lines


def order_differences(inter_path: Path) -> dict:
    """How RecBole's chronological order differs from the exact one peftrec uses. RecBole
    min-max scales the timestamps and keeps them as float32, so interactions a second or so
    apart tie and keep their order in the file. Returns the number of users, of users whose
    sequence is ordered differently, and of those whose last two items (the validation and
    test targets) differ."""
    import pandas as pd

    log = pd.read_csv(inter_path, sep="\t", quoting=csv.QUOTE_NONE,
                      usecols=["user_id:token", "item_id:token", "timestamp:float"])
    log.columns = ["user", "item", "timestamp"]
    stamps = log["timestamp"]
    scaled = ((stamps - stamps.min()) / (stamps.max() - stamps.min())).astype("float32")

    def sequences(frame: pd.DataFrame) -> list[list]:
        ordered = frame.sort_values(["user", "timestamp"], kind="stable")
        return ordered.groupby("user", sort=True)["item"].agg(list).tolist()

    exact, recbole = sequences(log), sequences(log.assign(timestamp=scaled))
    return {"users": len(exact),
            "order_differs": sum(a != b for a, b in zip(exact, recbole, strict=True)),
            "targets_differ": sum(a[-2:] != b[-2:] for a, b in zip(exact, recbole, strict=True))}


def report(table: list[dict], setup: dict, differences: dict) -> str:
    """The Markdown table, what the RecBole run saw, the remaining difference in the data,
    and the target lines."""
    anomaly = ("ON" if setup["anomaly_detection"] else
               "off (sine.py switches it on at import; the worker made that a no-op)")
    return "\n".join([
        markdown(table, COLUMNS, cell), "",
        f"RecBole: autograd anomaly detection {anomaly}; {setup['users']:,} users, "
        f"{setup['items']:,} items, {setup['interactions']:,} interactions; "
        f"torch threads: {setup['torch_threads']}. Seconds are wall time since each run's "
        "process started; load is the 1-minute load average. RecBole orders interactions by "
        "float32 timestamps scaled to [0, 1], which ties those about a second apart: "
        f"{differences['order_differs']} of {differences['users']} users' sequences are "
        f"ordered differently from peftrec's exact order, {differences['targets_differ']} "
        "of them in the validation or test target.", "",
        *target_lines(table),
    ])


def run_record(run_dir: Path) -> dict:
    record = json.loads((run_dir / "run.json").read_text())
    return {"load": {"start": record["load_start"], "end": record["load_end"]}}


def load_recbole(run_dir: Path, batch_size: int) -> dict:
    summary = recbole_summary((run_dir / "output.log").read_text())
    return {**summary, **run_record(run_dir),
            "settings": f"its SASRec defaults, batch {batch_size}"}


def load_peftrec(run_dir: Path, flags: list[str]) -> dict:
    log_rows = [json.loads(line)
                for line in (run_dir / "run" / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "run" / "metrics.json").read_text())
    summary = peftrec_summary((run_dir / "output.log").read_text(), log_rows, metrics)
    return {**summary, **run_record(run_dir), "settings": " ".join(flags) or "-"}


def cell(column: str, value) -> str:
    if value is None:
        return "not reached"
    if column.startswith("load"):
        return f"{value:.1f}"
    if column in (RATIO, CPU_RATIO):
        return f"{value:.3f}"
    if column in (TO_BEST, CPU_TO_BEST, "total s"):
        return f"{value:,.0f}"
    return number(value)


def run_folder(output_dir: Path, row: str) -> Path:
    return output_dir / re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/vs-recbole"))
    parser.add_argument("--recbole-venv", type=Path, default=Path("runs/recbole-venv"),
                        help="RecBole's virtual environment (created on first use)")
    parser.add_argument("--seed", type=int, default=42, help="both systems' seed")
    parser.add_argument("--recbole-batch-size", type=int, default=256)
    # On a machine shared with other jobs, a two-thread run waits for its second thread at
    # every operator; RecBole's many small ones suffer most (measured: ~10x its CPU time).
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--only", nargs="*", choices=[name for name, _ in ROWS],
                        help="run only these peftrec rows (RecBole always runs)")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: summarise the finished runs")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md}")
    parser.add_argument("--recbole-worker", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recbole_worker:  # inside RecBole's venv, started by run_recbole
        recbole_worker(json.loads(args.recbole_worker))
        return
    venv, output_dir = args.recbole_venv.resolve(), args.output_dir.resolve()
    rows = [(name, flags) for name, flags in ROWS if args.only is None or name in args.only]
    recbole_dir, data_dir = output_dir / "recbole", output_dir / "data" / "ml-100k"
    if not args.summary_only:  # peftrec first: its runs are the short ones
        prepare_peftrec_data(venv, data_dir)
        for name, flags in rows:
            if not finished(run_folder(output_dir, name)):
                start_afresh(run_folder(output_dir, name))
                run_peftrec(data_dir, run_folder(output_dir, name), args.seed, flags,
                            args.threads)
        if not finished(recbole_dir):
            start_afresh(recbole_dir)
            run_recbole(venv, recbole_dir, args.seed, args.recbole_batch_size, args.threads)
    if not finished(recbole_dir):
        raise SystemExit(f"error: no finished RecBole run in {recbole_dir}; run without "
                         "--summary-only")
    recbole = load_recbole(recbole_dir, args.recbole_batch_size)
    peftrec = {name: load_peftrec(run_folder(output_dir, name), flags)
               for name, flags in rows if finished(run_folder(output_dir, name))}
    table = table_rows(recbole, peftrec)
    differences = order_differences(recbole_dataset_folder(venv) / "ml-100k" / "ml-100k.inter")
    text = report(table, recbole["setup"], differences)
    print(text)
    if args.results:
        from results import write_result  # needs peftrec's venv: not at the top of the file

        curves = {system: [(e["epoch"], e["seconds"], e["cpu_seconds"], e["valid"]["ndcg@10"])
                           for e in summary["epochs"]]
                  for system, summary in [(RECBOLE, recbole), *peftrec.items()]}
        write_result(args.results, table, text, extra={
            "recbole_setup": recbole["setup"],
            "recbole_settings": recbole_settings(recbole_dataset_folder(venv), args.seed,
                                                 args.recbole_batch_size),
            "peftrec_shape": PEFTREC_SHAPE,
            "order_differences": differences,
            "curves": curves,  # per system: (epoch, wall s, CPU s, valid ndcg@10)
        })

if __name__ == "__main__":
    main()
