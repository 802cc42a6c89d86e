"""Scale: how training and evaluation cost grow with the catalog, the log and the process count.

Every measurement runs in a fresh subprocess, so its peak memory is its own (peak RSS on
CPU, peak allocated memory on a GPU, which is used when present). Prints tables, writes
results.json / results.md and a plot (scale.png) into --output-dir (and, with --results
NAME, benchmarks/results/NAME.{json,md}).

    python benchmarks/scale.py --output-dir runs/bench-scale          # full sizes
    python benchmarks/scale.py --quick --output-dir /tmp/scale        # a smoke run
    python benchmarks/scale.py --skip catalog logs processes --catalogs 1000000 \
        --chunks 10000 100000 1000000 --eval-users 256     # evaluation at 1M items only

1. training step (SASRec, batch 64 x 50 positions) against catalog size, full softmax (made
   a block of positions at a time, pretraining/losses.py) vs sampled softmax (1,024 shared
   negatives, logQ-corrected);
2. full-ranking evaluation against catalog size, and its peak memory against the item
   chunk size, for three models (--variants): ID item vectors (`id`), the same with the
   repeat bias (`id+repeat-bias`, which scores each chunk against the users' inputs), and
   a frozen text encoder (`text`: MiniLM's folder, its cache of pooled outputs filled with
   synthetic vectors, so the encoder never runs; the catalog's content vectors are made
   once per evaluation, `catalog_mb`, before the measured part);
3. the real pipeline on synthetic logs of growing size: generate -> prepare (k-core 2)
   -> train (memory-mapped, on-the-fly windows) for a fixed number of steps;
4. one epoch on ML-100k with 1 process x 2 threads vs 2 processes x 1 thread, and the
   2-process checkpoint evaluated with 1 and 2 processes (the metrics must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from tables import markdown

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, BATCH, LENGTH, NEGATIVES = 64, 64, 50, 1024
VARIANTS = ("id", "id+repeat-bias", "text")  # the models of the evaluation table


# ---------------------------------------------------------------- measurements (subprocess)
def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_mb(device) -> float:
    """Peak memory since the last `_reset_peak` (process start if never reset)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mb("VmHWM")


def _current_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def _reset_peak(device) -> None:
    """Forget the peak so far (e.g. of building the data), so the next peak is the model's."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to VmRSS


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(num_items: int, loss: str, device, variant: str = "id", cache_dir: str | None = None):
    """SASRec of `variant` (see VARIANTS) over `num_items` items."""
    import torch

    from peftrec.modality_encoders.content_encoder import ContentItemEncoder
    from peftrec.pretraining import RecommenderConfig, SequentialRecommender

    torch.manual_seed(0)
    encoder, encoder_config, content = "id", {}, None
    if variant == "text":
        from peftrec.modality_encoders import resolve_item_encoder_config

        encoder = "text"
        encoder_config = resolve_item_encoder_config("text", {"encoder": "minilm",
                                                              "template": "{title}"})
        content = _synthetic_text_content(num_items, Path(cache_dir))
    config = RecommenderConfig(
        num_items=num_items, loss=loss, num_negatives=NEGATIVES, item_encoder=encoder,
        item_encoder_config=encoder_config, repeat_bias=variant == "id+repeat-bias",
        backbone_config={"hidden_size": HIDDEN, "num_heads": 2, "ffn_size": 4 * HIDDEN,
                         "max_len": LENGTH},
    )
    # A text encoder's cache of pooled outputs, when missing, is filled with synthetic vectors
    # in place of running the encoder (MiniLM over 1M texts would take hours on a CPU);
    # later measurements load it, as a real run loads the cache its first run wrote.
    with mock.patch.object(ContentItemEncoder, "_build_pooled", _synthetic_outputs):
        return SequentialRecommender(config, content=content).to(device)


def _synthetic_outputs(encoder):
    """Seeded normal vectors [N, H] in place of a content encoder's pooled outputs."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(encoder.num_items, encoder.hidden_size, generator=generator)


def _synthetic_text_content(num_items: int, cache_dir: Path):
    """The texts of `num_items` items ("item 0", "item 1", ...), cached under `cache_dir`."""
    from peftrec.modality_encoders import ItemContent

    return ItemContent(item_ids=[str(i) for i in range(num_items)],
                       dataset_fingerprint=f"scale-synthetic-{num_items}", cache_dir=cache_dir,
                       texts=[f"item {i}" for i in range(num_items)],
                       content_fingerprint=f"item 0 .. item {num_items - 1}")


def _synthetic_windows(num_items: int, rows: int):
    """Real-structure item windows [rows, LENGTH + 1] from the synthetic generator."""
    import numpy as np
    import torch

    from peftrec.dataset_tools import SyntheticConfig, generate_sequences

    needed = rows * (LENGTH + 1)
    config = SyntheticConfig(num_interactions=needed, num_items=num_items,
                             num_users=max(1, needed // 100))
    items = np.concatenate([chunk[1] for chunk in generate_sequences(config)])
    return torch.from_numpy(items[:needed].reshape(rows, LENGTH + 1) + 1)


def measure_train_step(num_items: int, loss: str, steps: int, warmup: int = 2) -> dict:
    import torch

    from peftrec.pretraining.trainer import fused_if_supported

    device = _device()
    windows = _synthetic_windows(num_items, BATCH * (steps + warmup)).to(device)
    _reset_peak(device)
    baseline = _current_mb(device)
    model = _model(num_items, loss, device).train()
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, **fused_if_supported(parameters))
    # Parameters, gradients and AdamW's two moments: grows with the item table by design.
    state = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    batches = windows.split(BATCH)

    def step(window):
        batch = {"input_ids": window[:, :-1], "target_ids": window[:, 1:]}
        model.loss(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for window in batches[:warmup]:  # warm-up: allocator, kernels
        step(window)
    _sync(device)
    started = time.perf_counter()
    for window in batches[warmup:]:
        step(window)
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    peak = _peak_mb(device)
    return {"seconds_per_step": seconds, "positions_per_second": BATCH * LENGTH / seconds,
            "peak_mb": peak, "model_state_mb": state,
            # What the step itself needs on top of the model state: activations, logits.
            "working_mb": peak - baseline - state}


def measure_evaluation(num_items: int, chunk: int, users: int, variant: str = "id",
                       cache_dir: str | None = None) -> dict:
    import torch

    from peftrec.pretraining.evaluation import chunked_target_ranks

    device = _device()
    model = _model(num_items, "full", device, variant, cache_dir).eval()
    windows = _synthetic_windows(num_items, users).to(device)
    with torch.no_grad():
        # The item vectors: an ID model's table; a content encoder's made once here and kept
        # while in eval mode, as the evaluation's first chunk would make them.
        catalog_mb = _tensor_mb(model.item_encoder.catalog())
    _reset_peak(device)
    baseline = _current_mb(device)
    started = time.perf_counter()
    with torch.no_grad():
        for window in windows.split(256):
            query = model.query({"input_ids": window[:, :-1]})
            chunked_target_ranks(model, query, window[:, -1], chunk)
    _sync(device)
    return {"seconds": time.perf_counter() - started, "peak_mb": _peak_mb(device),
            "working_mb": _peak_mb(device) - baseline, "catalog_mb": catalog_mb}


def measure_generate(interactions: int, num_items: int, folder: str) -> dict:
    from peftrec.dataset_tools import (
        PrepareConfig,
        SyntheticConfig,
        prepare_dataset,
        write_synthetic_log,
    )

    raw, prepared = Path(folder) / "raw", Path(folder) / "prepared"
    started = time.perf_counter()
    stats = write_synthetic_log(SyntheticConfig(num_interactions=interactions,
                                                num_items=num_items), raw)
    generated = time.perf_counter() - started
    prepare_dataset(raw / "interactions.tsv", "tsv", prepared, PrepareConfig(k_core=2),
                    user_col="user_id", item_col="item_id", time_col="timestamp")
    info = json.loads((prepared / "dataset_info.json").read_text())["statistics"]
    return {"generate_seconds": generated, "prepare_seconds": time.perf_counter() - started
            - generated, "raw_mb": stats["bytes"] / 2**20, "dataset_mb": _size_mb(prepared),
            "users": info["users"], "items": info["items"],
            "interactions_after_cleaning": info["interactions"], "peak_mb": _peak_mb(_device())}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_mb(tensor) -> float:
    return tensor.numel() * tensor.element_size() / 2**20


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


MEASUREMENTS = {"train_step": measure_train_step, "evaluation": measure_evaluation,
                "generate": measure_generate}


# ---------------------------------------------------------------------- orchestration
def run_measurement(kind: str, **kwargs) -> dict:
    command = [sys.executable, __file__, "--measure", json.dumps({"kind": kind, **kwargs})]
    result = _run(command)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def catalog_rows(catalogs: list[int], steps: int, warmup: int) -> list[dict]:
    rows = []
    for num_items in catalogs:
        for loss in ("full", "sampled"):
            row = {"items": num_items, "loss": loss,
                   **run_measurement("train_step", num_items=num_items, loss=loss, steps=steps,
                                     warmup=warmup)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def evaluation_rows(catalogs: list[int], chunks: list[int], users: int, variants: list[str],
                    work: Path) -> list[dict]:
    rows = []
    for variant in variants:
        for num_items in catalogs:
            for chunk in chunks:
                if chunk > num_items and chunk != chunks[0]:
                    continue
                row = {"model": variant, "items": num_items, "chunk": chunk, "users": users,
                       **run_measurement("evaluation", num_items=num_items, chunk=chunk,
                                         users=users, variant=variant,
                                         cache_dir=str(work / "encoder-cache"))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def log_rows(logs: list[int], num_items: int, steps: int, work: Path) -> list[dict]:
    rows = []
    for interactions in logs:
        folder = work / f"log-{interactions}"
        row = {"interactions": interactions,
               **run_measurement("generate", interactions=interactions, num_items=num_items,
                                 folder=str(folder))}
        if "error" not in row:
            run = folder / "run"
            command = [sys.executable, str(ROOT / "scripts" / "pretrain_id.py"), "--dataset",
                       str(folder / "prepared"), "--output-dir", str(run), "--max-len",
                       str(LENGTH), "--batch-size", str(BATCH), "--max-steps", str(steps),
                       "--loss", "sampled", "--eval-users", "1000", "--report-to", "none",
                       "--train-windows", "all"]
            result = _run(command)
            if result.returncode == 0:
                training = json.loads((run / "metrics.json").read_text())["training"]
                row.update(train_positions_per_second=training["target_positions_per_second"],
                           train_peak_mb=training["peak_memory_mb"],
                           train_data_wait=training["data_wait_share"])
            else:
                row["error"] = result.stderr.strip().splitlines()[-1]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def process_rows(work: Path, dataset: str) -> list[dict]:
    """One epoch with 1 process x 2 threads and 2 processes x 1 thread; equal evaluation."""
    script = str(ROOT / "scripts" / "pretrain_id.py")
    common = ["--dataset", dataset, "--epochs", "1", "--report-to", "none", "--cpu"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    rows = []
    for processes, prefix, env in ((1, [sys.executable], {}),
                                   (2, launch, {"ACCELERATE_USE_CPU": "1"})):
        run = work / f"processes-{processes}"
        result = _run([*prefix, script, *common, "--output-dir", str(run)], env)
        if result.returncode != 0:
            rows.append({"processes": processes, "error": result.stderr.strip()[-300:]})
            continue
        epoch = json.loads((run / "log.jsonl").read_text().splitlines()[0])
        metrics = json.loads((run / "metrics.json").read_text())
        rows.append({"processes": processes, "epoch_seconds": epoch["seconds"],
                     "test_ndcg@10": metrics["test"]["ndcg@10"], "run": str(run)})
    if len(rows) == 2 and "error" not in rows[1]:
        # The 2-process checkpoint, re-evaluated by one process.
        result = _run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--run",
                       rows[1]["run"], "--cpu"])
        if result.returncode == 0:
            one = json.loads((Path(rows[1]["run"]) / "evaluation.json").read_text())
            two = json.loads((Path(rows[1]["run"]) / "metrics.json").read_text())
            rows[1]["same_metrics_at_1_process"] = one["test"] == two["test"]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "run"))
    return markdown(rows, columns, lambda column, value: _cell(value))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for loss in ("full", "sampled"):
        rows = [r for r in results["catalog"] if r["loss"] == loss and "error" not in r]
        x = [r["items"] for r in rows]
        axes[0].plot(x, [r["positions_per_second"] for r in rows], "o-", label=loss)
        axes[1].plot(x, [r["peak_mb"] for r in rows], "o-", label=f"{loss}: peak")
        axes[1].plot(x, [r["working_mb"] for r in rows], "s--", label=f"{loss}: working")
    chunk = results["evaluation"][0]["chunk"] if results["evaluation"] else None
    rows = [r for r in results["evaluation"] if r["chunk"] == chunk and r["model"] == "id"
            and "error" not in r]
    axes[2].plot([r["items"] for r in rows], [r["seconds"] for r in rows], "o-",
                 label=f"chunk {chunk:,}" if chunk else None)
    titles = ("training throughput (positions/s)", "training peak memory (MB)",
              f"evaluation of {rows[0]['users'] if rows else 0:,} users (s)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xscale("log")
        axis.set_xlabel("catalog size (items)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # none: that table was skipped
            axis.legend()
    figure.suptitle(f"peftrec scale ({results['device']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["catalog", "evaluation", "logs", "processes"])
    parser.add_argument("--catalogs", type=int, nargs="+",
                        help="catalog sizes of the catalog and evaluation tables (default: "
                        "10K, 100K, 1M; --quick: 1K, 10K)")
    parser.add_argument("--chunks", type=int, nargs="+",
                        help="item chunk sizes of the evaluation table (default: 100K, 10K, "
                        "1M; --quick: 1K, 100)")
    parser.add_argument("--eval-users", type=int,
                        help="users ranked per evaluation (default: 1,000; --quick: 200)")
    parser.add_argument("--train-steps", type=int,
                        help="timed training steps per catalog row (default: 10; --quick: 3)")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="untimed training steps before them")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the models of the evaluation table")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md}")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(MEASUREMENTS[spec.pop("kind")](**spec)))
        return
    import torch

    quick = args.quick
    catalogs = args.catalogs or ([1_000, 10_000] if quick else [10_000, 100_000, 1_000_000])
    logs = [20_000, 100_000] if quick else [100_000, 1_000_000, 10_000_000]
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    work = args.output_dir / "work"
    results = {"device": device, "catalog": [], "evaluation": [], "logs": [], "processes": []}
    if "catalog" not in args.skip:
        results["catalog"] = catalog_rows(catalogs, args.train_steps or (3 if quick else 10),
                                          args.warmup_steps)
    if "evaluation" not in args.skip:
        chunks = args.chunks or ([1_000, 100] if quick else [100_000, 10_000, 1_000_000])
        results["evaluation"] = evaluation_rows(catalogs, chunks, args.eval_users
                                                or (200 if quick else 1_000), args.variants,
                                                work)
    if "logs" not in args.skip:
        results["logs"] = log_rows(logs, 1_000 if quick else 100_000, 5 if quick else 100, work)
    if "processes" not in args.skip:
        results["processes"] = process_rows(work, "ml-100k")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    sections = [f"Device: {device}"]
    for name in ("catalog", "evaluation", "logs", "processes"):
        if results[name]:
            sections.append(f"### {name}\n\n{markdown_table(results[name])}")
    report = "\n\n".join(sections)
    (args.output_dir / "results.md").write_text(report + "\n")
    print(report)
    if results["catalog"]:
        plot(results, args.output_dir / "scale.png")
    if args.results:
        from results import write_result

        rows = [{"table": name, **row} for name in ("catalog", "evaluation", "logs", "processes")
                for row in results[name]]
        print(f"wrote {write_result(args.results, rows, report)}")


if __name__ == "__main__":
    main()
