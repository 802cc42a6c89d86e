"""Item encoders on MovieLens: text SASRec (frozen, cached MiniLM) against ID SASRec,
zero-shot transfer, and what encoding the catalog costs.

1. Quality on the source (ML-1M): test NDCG@10, HR@10 and MRR of an ID and a text
   pretraining run folder, next to a popularity baseline (items ranked by their
   training-split count). A run with metrics.json is summarised as it is; a run stopped
   before writing it is evaluated here from its best_model/. Full ranking, no history
   mask, pessimistic ties, every user: the protocol of benchmarks/sasrec_movielens.py,
   through pretraining/evaluation.py.
2. Zero-shot on the target (ML-100k): the text model evaluated there without any
   training (an existing zero-shot run folder, or scripts/finetune_full.py --zero-shot
   run here), next to the target's popularity baseline.
3. Encoding: items/s of the frozen encoder over the source catalog (no grad, chunked as
   the encoder chunks it), and the time to build the text model from its checkpoint
   with a cold encoder cache (encodes the catalog) and a warm one (reads the cached
   outputs back), in a fresh temporary cache folder, so existing caches are neither
   used nor touched. Each measurement runs in its own process: every build pays the
   same imports and file hashing, and the threads are the process's own (--threads).

    HF_HUB_OFFLINE=1 python benchmarks/modality_movielens.py \\
        --id-run runs/bench-sasrec/ml-1m --text-run runs/bench-text/ml-1m \\
        --zero-shot-run runs/bench-transfer/text/zero-shot/seed0 --output-dir runs/bench-modality

`--quick` evaluates a seeded sample of 500 users and times the encoding of 256 items.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tables import markdown, number

from peftrec.dataset_tools import SequenceData, default_template
from peftrec.dataset_tools.checkpoints import BEST_DIR, METRICS, RUN_CONFIG
from peftrec.pretraining.data import item_frequencies
from peftrec.pretraining.evaluation import EvaluationProtocol, ranking_metrics, target_ranks
from peftrec.pretraining.pipeline import (
    evaluate_model,
    evaluation_dataset,
    load_checkpoint,
    load_data,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK_USERS, QUICK_ITEMS = 500, 256
QUALITY_COLUMNS = ("model", "test ndcg@10", "test hr@10", "test mrr", "users", "epochs",
                   "best epoch", "s/epoch", "note")
ZERO_SHOT_COLUMNS = ("model", "test ndcg@10", "test hr@10", "test mrr", "users", "note")
ENCODING_COLUMNS = ("encoder", "items", "threads", "items/s", "cold build s", "warm build s",
                    "cold / warm", "saved s", "max diff vs cache")


# ------------------------------------------------------------------------------ quality
def test_columns(test: dict) -> dict:
    return {"test ndcg@10": test["ndcg@10"], "test hr@10": test["hr@10"],
            "test mrr": test["mrr"]}


def check_dataset(run_dir: Path, data: SequenceData) -> dict:
    """The run folder's config.json, checked to belong to `data`."""
    config = json.loads((run_dir / RUN_CONFIG).read_text())
    if config["dataset"]["fingerprint"] != data.fingerprint:
        raise ValueError(f"{run_dir} ran on {config['dataset']['path']}, not on {data.path}; "
                         "pass the dataset it ran on (--source-dataset / --target-dataset)")
    return config


def run_row(label: str, run_dir: Path, data: SequenceData, protocol: EvaluationProtocol,
            batch_size: int, accelerator: Accelerator) -> dict:
    """Test metrics and training figures of a pretraining run folder on `data`."""
    config = check_dataset(run_dir, data)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    if (run_dir / METRICS).is_file():
        metrics = json.loads((run_dir / METRICS).read_text())
        best_epoch, note = metrics["training"]["best_epoch"], ""
    else:
        model = load_checkpoint(run_dir / BEST_DIR, data)
        metrics = evaluate_model(model, data, protocol, batch_size, accelerator)
        selection = config["training"]["metric"]
        best_epoch = max(log, key=lambda row: row["valid"][selection])["epoch"]
        note = f"stopped at epoch {log[-1]['epoch']}: best_model/ evaluated here"
    return {"model": label, **test_columns(metrics["test"]),
            "users": metrics["protocol"]["num_users"], "epochs": len(log),
            "best epoch": best_epoch,
            "s/epoch": statistics.median(row["seconds"] for row in log), "note": note}


def popularity_row(data: SequenceData, protocol: EvaluationProtocol, batch_size: int) -> dict:
    """Every user gets the same ranking: items by training-split count, ranked over the
    whole catalog like a model's scores (no history mask, pessimistic ties)."""
    scores = item_frequencies(data).float()  # counts below 2**24: exact in float32
    test = evaluation_dataset(data, "test", 1, protocol)  # the history is not used
    targets = torch.as_tensor([test[i]["target_ids"] for i in range(len(test))])
    ranks = torch.cat([target_ranks(scores.expand(len(batch), -1), batch)
                       for batch in targets.split(batch_size)])
    return {"model": "popularity", **test_columns(ranking_metrics(ranks, protocol.ks)),
            "users": len(ranks), "note": f"{data.name} training-split counts"}


# ---------------------------------------------------------------------------- zero-shot
def zero_shot_row(args: argparse.Namespace, target: SequenceData,
                  protocol: EvaluationProtocol) -> dict:
    """The text model on the target without training: `--zero-shot-run`'s metrics.json if
    it has one, else scripts/finetune_full.py --zero-shot into OUTPUT_DIR/zero-shot."""
    run_dir = args.zero_shot_run
    if run_dir is None or not (run_dir / METRICS).is_file():
        if run_dir is not None:
            print(f"{run_dir} holds no {METRICS}; evaluating zero-shot here", flush=True)
        run_dir = args.output_dir / "zero-shot"
    if not (run_dir / METRICS).is_file():
        template = args.target_text_template or default_template(target.name).template
        command = [sys.executable, str(ROOT / "scripts" / "finetune_full.py"), "--zero-shot",
                   "--pretrained", str(args.text_run), "--dataset", str(target.path),
                   "--text-template", template, "--output-dir", str(run_dir),
                   "--seed", str(protocol.user_sample_seed),
                   "--eval-batch-size", str(args.eval_batch_size), "--report-to", "none"]
        if protocol.max_users is not None:
            command += ["--eval-users", str(protocol.max_users)]
        print("+", shlex.join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env=subprocess_environment())
    check_dataset(run_dir, target)
    metrics = json.loads((run_dir / METRICS).read_text())
    return {"model": "text SASRec, zero-shot", **test_columns(metrics["test"]),
            "users": metrics["protocol"]["num_users"], "note": f"no training ({run_dir})"}


# ---------------------------------------------------------------- encoding (subprocess)
def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def measure_build(text_run: str, dataset: str, encoder_cache_dir: str,
                  threads: int | None) -> dict:
    """Seconds to build the text model from its checkpoint, encoder cache in the folder."""
    set_threads(threads)
    data = load_data(dataset, None)
    started = time.perf_counter()
    load_checkpoint(Path(text_run) / BEST_DIR, data, encoder_cache_dir=Path(encoder_cache_dir))
    return {"seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}


def measure_encoding(text_run: str, dataset: str, encoder_cache_dir: str, threads: int | None,
                     max_items: int | None) -> dict:
    """Items/s of the frozen encoder over the catalog (or its first `max_items` items), in
    the encoder's chunks, and the largest difference to the vectors the cache holds."""
    from peftrec.modality_encoders.transformer import TransformerStages, pool

    set_threads(threads)
    data = load_data(dataset, None)
    model = load_checkpoint(Path(text_run) / BEST_DIR, data,
                            encoder_cache_dir=Path(encoder_cache_dir))
    items = model.item_encoder
    settings = items.settings
    stages = TransformerStages(items.path, settings.encoder, items.modality).eval()
    count = min(items.num_items, max_items or items.num_items)
    chunks = torch.arange(1, count + 1).split(settings.encode_batch_size)
    with torch.no_grad():
        stages(items.inputs(chunks[0]))  # warm-up: allocator, first-call overheads
        started = time.perf_counter()
        pooled = []
        for chunk in chunks:
            inputs = items.inputs(chunk)
            pooled.append(pool(stages(inputs), inputs["attention_mask"], settings.pooling))
        seconds = time.perf_counter() - started
    difference = (torch.cat(pooled).float() - items.outputs[:count]).abs().max().item()
    return {"encoder": settings.encoder, "items": count, "threads": torch.get_num_threads(),
            "items/s": count / seconds, "max diff vs cache": difference}


MEASUREMENTS = {"build": measure_build, "encode": measure_encoding}


def subprocess_environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_measurement(kind: str, **spec) -> dict:
    command = [sys.executable, __file__, "--measure", json.dumps({"kind": kind, **spec})]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env=subprocess_environment())
    if result.returncode != 0:
        raise RuntimeError(f"measurement {kind} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def encoding_row(text_run: Path, source: SequenceData, threads: int | None,
                 max_items: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="encoder-cache-") as encoder_cache_dir:
        spec = {"text_run": str(text_run), "dataset": str(source.path),
                "encoder_cache_dir": encoder_cache_dir, "threads": threads}
        cold = run_measurement("build", **spec)["seconds"]  # empty folder: encodes
        warm = run_measurement("build", **spec)["seconds"]  # reads what the cold build cached
        encoding = run_measurement("encode", **spec, max_items=max_items)
    return {**encoding, "cold build s": cold, "warm build s": warm, "cold / warm": cold / warm,
            "saved s": cold - warm}


# ------------------------------------------------------------------------------ report
def cell(column: str, value) -> str:
    if isinstance(value, float) and 0 < abs(value) < 1e-3:
        return f"{value:.1e}"  # e.g. the max difference against the cache
    return number(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--id-run", type=Path, default=Path("runs/bench-sasrec/ml-1m"))
    parser.add_argument("--text-run", type=Path, default=Path("runs/bench-text/ml-1m"))
    parser.add_argument("--zero-shot-run", type=Path,
                        help="a finished zero-shot run folder of --text-run on the target "
                        "(default: evaluate into OUTPUT_DIR/zero-shot)")
    parser.add_argument("--source-dataset", default="ml-1m",
                        help="the dataset both runs were pretrained on (name or folder)")
    parser.add_argument("--target-dataset", default="ml-100k", help="name or folder")
    parser.add_argument("--target-text-template",
                        help="item text template of the target (default: its built-in one)")
    parser.add_argument("--cache-dir", type=Path, help="where built-in datasets are prepared")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int,
                        help="torch threads of the encoding measurements (default: torch's)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench-modality"))
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_USERS} sampled users, {QUICK_ITEMS} encoded items")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(MEASUREMENTS[spec.pop("kind")](**spec)))
        return

    protocol = EvaluationProtocol(max_users=QUICK_USERS if args.quick else None,
                                  user_sample_seed=0)
    source = load_data(args.source_dataset, args.cache_dir)
    target = load_data(args.target_dataset, args.cache_dir)
    accelerator = Accelerator()
    quality = [
        run_row("ID SASRec", args.id_run, source, protocol, args.eval_batch_size, accelerator),
        run_row("text SASRec (frozen encoder)", args.text_run, source, protocol,
                args.eval_batch_size, accelerator),
        popularity_row(source, protocol, args.eval_batch_size),
    ]
    zero_shot = [zero_shot_row(args, target, protocol),
                 popularity_row(target, protocol, args.eval_batch_size)]
    encoding = encoding_row(args.text_run, source, args.threads,
                            QUICK_ITEMS if args.quick else None)

    results = {"source": source.name, "target": target.name, "quality": quality,
               "zero_shot": zero_shot, "encoding": encoding}
    report = "\n\n".join([
        f"### Quality on {source.name} (full ranking, test split)",
        markdown(quality, QUALITY_COLUMNS, cell),
        f"### Zero-shot on {target.name} (pretrained on {source.name}, no training)",
        markdown(zero_shot, ZERO_SHOT_COLUMNS, cell),
        f"### Encoding the {source.name} catalog (frozen encoder; cold vs warm cache)",
        markdown([encoding], ENCODING_COLUMNS, cell),
    ])
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "results.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
