"""Transfer from a pretrained source to a target: adapters against full fine-tuning, training
from scratch, zero-shot and popularity.

For each pretrained source (a pretraining run folder: ID, text, image, text+id or DiffRec;
`--source LABEL=RUN_DIR`), every row of the grid that fits the source's kind is fine-tuned on
`--target` with each seed, each run in its own process (so peak memory is the run's own), by
the repository's scripts. Rows that carry items across domains by a shared item field
(`--match-items-by`, e.g. `movie_title,release_year` for ML-1M -> ML-100k) run only when it
is given. The table reports the mean and spread (sample standard deviation) over seeds of
test NDCG@10 and HR@10 (full ranking, no history mask), the trainable parameters (as a
share of the model as built, and of every parameter it uses: a frozen encoder whose
outputs are cached is outside the model as built, so only the second counts it), the size
of the saved checkpoint (adapter-only for adapters), the fine-tuning time and the peak
memory, next to the target's popularity ranking, then checks the targets:
- the best adapter training <= 5% of the model reaches >= 100% of full fine-tuning's
  NDCG@10 and >= 1.1x training from scratch,
- zero-shot (content models) scores >= 2x popularity.
Finished runs are summarised without training again; interrupted ones resume.

    python benchmarks/transfer.py --source id=runs/sources/ml1m-id \\
        --source text=runs/sources/ml1m-text --target ml-100k \\
        --match-items-by movie_title,release_year --results transfer/ml-1m-to-ml-100k \\
        --output-dir runs/bench-transfer -- --repeat-bias --patience 20

`--results NAME` also writes benchmarks/results/NAME.{json,md,png} (provenance included;
README blocks are generated from them by `python benchmarks/results.py`). Extra flags
after `--` go to every fine-tuning run; a row's own settings (e.g. the learning rate and
batch size its method was tuned with) come after them and win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from results import add_run_arguments, publish_report
from tables import markdown, spread

ROOT = Path(__file__).resolve().parents[1]
MATCH = "{match}"  # stands for --match-items-by's fields: rows holding it run only when given
TEXT = ("text", "text+id")  # source kinds with a text encoder (a fusion one included)
# (name, script, flags, which source kinds it applies to)
GRID = [
    ("scratch", "finetune_full", ["--from-scratch"], ("id", *TEXT, "diffrec")),
    # From scratch at higher rates too: the reference adapters must beat, chosen on
    # validation like full fine-tuning's.
    ("scratch lr 3e-3", "finetune_full", ["--from-scratch", "--lr", "3e-3"], TEXT),
    ("scratch lr 1e-2", "finetune_full", ["--from-scratch", "--lr", "1e-2"], TEXT),
    ("zero-shot", "finetune_full", ["--zero-shot"], TEXT),
    # No training either, but the target's item counts: log(1 + count) added to the scores
    # with the weight chosen on validation.
    ("zero-shot + popularity prior", "finetune_full",
     ["--zero-shot", "--popularity-prior", "auto"], TEXT),
    # An ID (or text+id) model scores the target's items it shares with the source by their
    # pretrained vectors, without training (the others start fresh).
    ("zero-shot matched", "finetune_full", ["--zero-shot", "--match-items-by", MATCH],
     ("id", "text+id")),
    ("full fine-tuning", "finetune_full", [], ("id", *TEXT, "diffrec")),
    ("full fine-tuning matched", "finetune_full", ["--match-items-by", MATCH],
     ("id", "text+id", "diffrec")),
    ("full fine-tuning b32", "finetune_full", ["--batch-size", "32"], TEXT),
    # Full fine-tuning at higher rates, chosen against 1e-3 on validation: an adapter's
    # rate is tuned, so the reference it is measured against is too.
    ("full fine-tuning lr 3e-3", "finetune_full", ["--lr", "3e-3"], TEXT),
    ("full fine-tuning lr 1e-2", "finetune_full", ["--lr", "1e-2"], TEXT),
    # With the score offset per item the best small adapter uses: the reference gets it too.
    ("full fine-tuning + item bias lr 3e-3", "finetune_full", ["--lr", "3e-3", "--item-bias"],
     TEXT),
    ("houlsby backbone all", "adapter_houlsby", ["--adapt", "backbone", "--layers", "all"],
     ("id", "text", "diffrec")),
    # Matched items keep their pretrained rows, frozen: only the new items' rows and the
    # adapters train, so an ID model's adapter stays a few percent of it.
    ("houlsby backbone all, matched frozen", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--match-items-by", MATCH,
      "--freeze-matched-items"], ("id", "text+id", "diffrec")),
    # The same with the matched rows trained too: what freezing them costs.
    ("houlsby backbone all, matched", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--match-items-by", MATCH],
     ("id", "diffrec")),
    ("houlsby backbone top:1", "adapter_houlsby", ["--adapt", "backbone", "--layers", "top:1"],
     ("id", "text")),
    ("houlsby backbone all + projection", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--tune", "projection"], ("text",)),
    # Probes (one seed): a higher learning rate for the adapters, and the layer norms
    # (so also the output norm before the dot product) trained too.
    ("houlsby backbone all + projection lr 3e-3", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--tune", "projection", "--lr", "3e-3"],
     ("text",)),
    ("houlsby backbone all + projection + layernorm lr 3e-3", "adapter_houlsby",
     ["--adapt", "backbone", "--layers", "all", "--tune", "projection,layernorm", "--lr",
      "3e-3"], ("text",)),
    ("houlsby item_encoder head b32", "adapter_houlsby",
     ["--adapt", "item_encoder", "--sites", "projection", "--reduction-factor", "1", "--lr",
      "5e-3", "--batch-size", "32"], TEXT),
    # The same bottleneck at a quarter of the width: under 5% of a d=64 model.
    ("houlsby item_encoder head r4 b32", "adapter_houlsby",
     ["--adapt", "item_encoder", "--sites", "projection", "--reduction-factor", "4", "--lr",
      "5e-3", "--batch-size", "32"], TEXT),
    ("houlsby item_encoder top:1", "adapter_houlsby",
     ["--adapt", "item_encoder", "--layers", "top:1"], ("text",)),
    ("houlsby both top:1", "adapter_houlsby", ["--adapt", "both", "--layers", "top:1"],
     ("text",)),
    ("houlsby both top:2", "adapter_houlsby", ["--adapt", "both", "--layers", "top:2"],
     ("text",)),
    # End to end (Adapter4Rec): adapters in the text encoder's top K layers and the backbone,
    # the item head trained too (benchmarks/end_to_end_gpu.sh).
    ("houlsby both top:1 + projection b32", "adapter_houlsby",
     ["--adapt", "both", "--layers", "top:1", "--tune", "projection", "--batch-size", "32"],
     ("text",)),
    ("houlsby both top:2 + projection b32", "adapter_houlsby",
     ["--adapt", "both", "--layers", "top:2", "--tune", "projection", "--batch-size", "32"],
     ("text",)),
    ("lora backbone all", "adapter_lora", ["--adapt", "backbone", "--layers", "all"],
     ("id", "text", "diffrec")),
    ("lora backbone all, matched frozen", "adapter_lora",
     ["--adapt", "backbone", "--layers", "all", "--match-items-by", MATCH,
      "--freeze-matched-items"], ("id", "diffrec")),
    ("lora item_encoder top:1", "adapter_lora",
     ["--adapt", "item_encoder", "--layers", "top:1"], ("text",)),
    # LoRA on the text encoder's output head only (the cache stays): rank 32, tuned on
    # validation with batch 32 and lr 5e-3; rank 8 keeps it under 5% of a d=64 model.
    ("lora item_encoder head b32", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "32", "--alpha",
      "64", "--lr", "5e-3", "--batch-size", "32"], TEXT),
    ("lora item_encoder head r8 b32", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "8", "--alpha",
      "16", "--lr", "5e-3", "--batch-size", "32"], TEXT),
    ("lora item_encoder head r8", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "8", "--alpha",
      "16", "--lr", "5e-3"], TEXT),
    # The head LoRA plus the layer norms (the output norm scales every score): +0.6k.
    ("lora item_encoder head r8 + layernorm", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "8", "--alpha",
      "16", "--lr", "5e-3", "--tune", "layernorm"], TEXT),
    # A larger head rank with the layer norms (4.4%): the head adapter underfits (training
    # loss 5.99 against full fine-tuning's 5.83 at epoch 40), so more of what it moves.
    ("lora item_encoder head r12 + layernorm", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "12", "--alpha",
      "24", "--lr", "5e-3", "--tune", "layernorm"], TEXT),
    # The same at the next rate of the grid (5e-3 was its edge), chosen on validation.
    ("lora item_encoder head r12 + layernorm lr 1e-2", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "12", "--alpha",
      "24", "--lr", "1e-2", "--tune", "layernorm"], TEXT),
    # The rank 8 head + layer norms with a learned score offset per target item
    # (--item-bias): what a text model cannot give an item from its text (its popularity
    # here). N + 1 parameters: 3.9% of the model on ML-100k. The rate chosen on validation.
    ("lora item_encoder head r8 + layernorm + item bias", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "8", "--alpha",
      "16", "--lr", "5e-3", "--tune", "layernorm", "--item-bias"], TEXT),
    ("lora item_encoder head r8 + layernorm + item bias lr 1e-2", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "8", "--alpha",
      "16", "--lr", "1e-2", "--tune", "layernorm", "--item-bias"], TEXT),
    # Rank 4: on a source with --token-vectors (a moe head of eight experts over a
    # word-piece table whose unused rows inflate the model as built) it stays under 5% of
    # the parameters the target's items use, as rank 8 does not.
    ("lora item_encoder head r4 + layernorm + item bias lr 1e-2", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "4", "--alpha",
      "8", "--lr", "1e-2", "--tune", "layernorm", "--item-bias"], TEXT),
    # LoRA on the word-piece table too (a source with --token-vectors): the target's words
    # that the source never saw are zero there and stay zero under a head adapter; a rank 2
    # table update gives each word piece two numbers of its own (2 x (V + d) as built).
    # Under 5% of the model as built and of the parameters the target's items use.
    *[(f"lora head r4 + token table r2 + layernorm + item bias lr {lr}", "adapter_lora",
       ["--adapt", "item_encoder", "--target-modules", "projection,token_vectors", "--rank",
        "4", "--alpha", "8", "--rank-pattern", "token_vectors=2", "--lr", lr, "--tune",
        "layernorm", "--item-bias"], TEXT)
      for lr in ("1e-2", "5e-3", "2e-2")],
    # With rank 1 in the backbone's feed-forward layers too (4.8% on ML-100k): full
    # fine-tuning's lead grew with its rate, and it is the backbone that moves then.
    ("lora head r8 + ffn r1 + layernorm + item bias lr 1e-2", "adapter_lora",
     ["--adapt", "both", "--target-modules", "fc1,fc2,projection", "--rank", "8", "--alpha",
      "16", "--rank-pattern", "fc1=1,fc2=1", "--lr", "1e-2", "--tune", "layernorm",
      "--item-bias"], TEXT),
    # The head at rank 8 plus rank 2 in the backbone's feed-forward layers, norms too (4.7%).
    ("lora head r8 + ffn r2 + layernorm", "adapter_lora",
     ["--adapt", "both", "--target-modules", "fc1,fc2,projection", "--rank", "8", "--alpha",
      "16", "--rank-pattern", "fc1=2,fc2=2", "--lr", "5e-3", "--tune", "layernorm"], TEXT),
    # LoRA on the backbone's attention queries and values and on the text head (~3%).
    ("lora both q,v + head r4", "adapter_lora",
     ["--adapt", "both", "--target-modules", "q_proj,v_proj,projection", "--rank", "4",
      "--alpha", "8", "--lr", "5e-3"], TEXT),
    # A fusion model's shared items keep their pretrained ID rows, frozen; the head adapts.
    ("lora item_encoder head r8, matched frozen", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection", "--rank", "8", "--alpha",
      "16", "--lr", "5e-3", "--match-items-by", MATCH, "--freeze-matched-items"],
     ("text+id",)),
    # LoRA on the item table (rank 2: r x (N + d) factors) moves every matched row within a
    # few percent of the model; the fresh rows train as usual. The learning rate is chosen
    # on validation between the two rows of each pair (seed 0), then run over the seeds.
    ("lora item table r2, matched", "adapter_lora",
     ["--adapt", "item_encoder", "--rank", "2", "--alpha", "4", "--lr", "1e-3",
      "--match-items-by", MATCH], ("id",)),
    ("lora item table r2 lr 5e-3, matched", "adapter_lora",
     ["--adapt", "item_encoder", "--rank", "2", "--alpha", "4", "--lr", "5e-3",
      "--match-items-by", MATCH], ("id",)),
    # Rank 4 at the rate rank 2 chose: the largest rank whose factors and fresh rows stay
    # under 5% of the ID model.
    ("lora item table r4 lr 5e-3, matched", "adapter_lora",
     ["--adapt", "item_encoder", "--rank", "4", "--alpha", "8", "--lr", "5e-3",
      "--match-items-by", MATCH], ("id",)),
    # A fusion model: LoRA on its text head and on its ID table, both rank 2.
    ("lora head + id table r2, matched", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection,id_embedding", "--rank", "2",
      "--alpha", "4", "--lr", "1e-3", "--match-items-by", MATCH], ("text+id",)),
    ("lora head + id table r2 lr 5e-3, matched", "adapter_lora",
     ["--adapt", "item_encoder", "--target-modules", "projection,id_embedding", "--rank", "2",
      "--alpha", "4", "--lr", "5e-3", "--match-items-by", MATCH], ("text+id",)),
    # LoRA in every backbone Linear and on the text encoder's output head together.
    ("lora both all + head", "adapter_lora",
     ["--adapt", "both", "--target-modules", "q_proj,k_proj,v_proj,o_proj,fc1,fc2,projection",
      "--rank", "4", "--alpha", "8"], ("text",)),
    ("prefix backbone all", "adapter_prefix",
     ["--method", "prefix", "--adapt", "backbone", "--layers", "all"], ("id", "text")),
    ("diffusion_step backbone all", "adapter_diffusion_step",
     ["--adapt", "backbone", "--layers", "all"], ("diffrec",)),
    ("diffusion_step step MLP only", "adapter_diffusion_step", ["--step-mlp-only"],
     ("diffrec",)),
]
BASELINES = ("scratch", "zero-shot", "zero-shot + popularity prior", "zero-shot matched",
             "popularity")
ADAPTER_SHARE = 5.0  # % of the model an adapter may train for the targets
COLUMNS = ("source", "method", "seeds", "test ndcg@10", "test hr@10", "trainable",
           "trainable %", "% incl. encoder", "matched items", "checkpoint MB", "fine-tune s",
           "peak MB")


def source_kind(source: Path) -> str:
    """Which grid rows fit a pretraining run: 'diffrec', 'text', 'image' or 'id'."""
    config = source / "config.json"
    if not config.is_file():
        sys.exit(f"{source} is not a pretraining run folder (no config.json); pass "
                 "--source LABEL=RUN_DIR with the output directory of a pretraining script")
    model = json.loads(config.read_text())["model"]
    return "diffrec" if model["backbone"] == "diffrec" else model["item_encoder"]


def run_folder(name: str) -> str:
    """The folder of a grid row's runs (under OUTPUT_DIR/LABEL/, one seedN/ per seed)."""
    return name.replace(" ", "-").replace(":", "").replace(",", "")


def run_one(script: str, flags: list[str], source: Path, run_dir: Path, seed: int,
            target: str, extra: list[str]) -> dict:
    if not (run_dir / "metrics.json").is_file():
        resume = ["--resume"] if (run_dir / "config.json").is_file() else []
        command = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--pretrained",
                   str(source), "--dataset", target, "--output-dir", str(run_dir), "--seed",
                   str(seed), "--report-to", "none", *extra, *flags, *resume]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((run_dir / "metrics.json").read_text())


def frozen_encoder_parameters(run_dir: Path) -> int:
    """Parameters of a content encoder kept frozen outside the model (its outputs cached):
    the model as built, and so metrics.json's count, leaves them out."""
    model = json.loads((run_dir / "config.json").read_text())["model"]
    settings = model.get("item_encoder_config") or {}
    if model["item_encoder"] == "id" or not settings.get("freeze", True):
        return 0
    from safetensors import safe_open

    from peftrec.modality_encoders.transformer import resolve_encoder_path

    weights = resolve_encoder_path(settings["encoder"]) / "model.safetensors"
    with safe_open(str(weights), "pt") as tensors:
        names = tensors.keys()  # a safe_open handle is not iterable itself
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)


def summarize(source: str, name: str, runs: list[dict], run_dirs: list[Path]) -> dict:
    seconds = []
    for run_dir in run_dirs:
        log = run_dir / "log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        seconds.append(sum(row["seconds"] for row in rows))
    parameters = runs[0].get("parameters")
    training = [run.get("training") or {} for run in runs]
    # The share of every parameter the model uses, a frozen cached encoder included.
    outside = frozen_encoder_parameters(run_dirs[0])
    inclusive = (100 * parameters["trainable"] / (parameters["total"] + outside)
                 if parameters else 0.0)
    config = json.loads((run_dirs[0] / "config.json").read_text())
    matching = config.get("transfer", {}).get("item_matching") or {}
    return {
        "source": source,
        "method": name,
        "seeds": len(runs),
        "ndcg": [run["test"]["ndcg@10"] for run in runs],
        "valid": [run["valid"]["ndcg@10"] for run in runs],
        "hr": [run["test"]["hr@10"] for run in runs],
        "test ndcg@10": spread([run["test"]["ndcg@10"] for run in runs]),
        "test hr@10": spread([run["test"]["hr@10"] for run in runs]),
        "trainable": f"{parameters['trainable']:,}" if parameters else "0",
        "trainable %": f"{parameters['trainable_percent']:.2f}" if parameters else "0.00",
        "percent": parameters["trainable_percent"] if parameters else 0.0,
        "% incl. encoder": f"{inclusive:.2f}",
        "matched items": _matched(matching),
        "checkpoint MB": f"{statistics.mean(r.get('checkpoint_mb', 0.0) for r in runs):.3f}",
        "fine-tune s": f"{statistics.mean(seconds):.0f}",
        "peak MB": f"{max(t.get('peak_memory_mb', 0.0) for t in training):,.0f}",
    }


def _matched(matching: dict) -> str:
    """"matched / target items" of a run that carried items across by a shared field."""
    counts = {key: matching.get(key) for key in ("matched", "target_items")}
    return "" if None in counts.values() else f"{counts['matched']:,} / {counts['target_items']:,}"


def popularity(target: str) -> dict:
    """The target's popularity ranking (training-split counts), as a table row."""
    from modality_movielens import popularity_row

    from peftrec.pretraining.evaluation import EvaluationProtocol
    from peftrec.pretraining.pipeline import load_data

    row = popularity_row(load_data(target, None), EvaluationProtocol(), batch_size=1024)
    ndcg, hr = row["test ndcg@10"], row["test hr@10"]
    return {"source": "-", "method": "popularity", "seeds": 1, "ndcg": [ndcg], "hr": [hr],
            "test ndcg@10": f"{ndcg:.4f}", "test hr@10": f"{hr:.4f}", "trainable": "0",
            "trainable %": "0.00", "percent": 0.0}


def mean(row: dict) -> float:
    """Mean test NDCG@10 over seeds."""
    return statistics.mean(row["ndcg"])


def validation(row: dict) -> float:
    """Mean validation NDCG@10 over seeds: what rows are chosen by."""
    return statistics.mean(row["valid"])


def check_targets(rows: list[dict]) -> list[str]:
    """The targets, per source, as lines of text: the best adapter training <= 5% of the
    model against full fine-tuning (>= 100%) and from scratch (>= 1.1x), the adapter and
    both references chosen on validation (each among the rows named after it: `full
    fine-tuning lr 3e-3`, `scratch lr 3e-3`); zero-shot against popularity (>= 2x)."""
    lines = []
    popular = next((row for row in rows if row["method"] == "popularity"), None)
    for source in dict.fromkeys(row["source"] for row in rows if row["method"] != "popularity"):
        by_name = {row["method"]: row for row in rows if row["source"] == source}
        fulls = [row for name, row in by_name.items() if name.startswith("full fine-tuning")]
        scratches = [row for name, row in by_name.items() if name.startswith("scratch")]
        adapters = [row for name, row in by_name.items()
                    if name not in BASELINES and row not in fulls + scratches]
        for name in ("zero-shot", "zero-shot + popularity prior", "zero-shot matched"):
            if name in by_name and popular is not None:
                ratio = mean(by_name[name]) / mean(popular)
                lines.append(f"{source}: {name} {mean(by_name[name]):.4f} = {ratio:.2f}x "
                             f"popularity ({mean(popular):.4f}) -> "
                             f"{'met' if ratio >= 2 else 'NOT met'} (target >= 2x)")
        small = [row for row in adapters if row["percent"] <= ADAPTER_SHARE]
        if not small or not fulls:
            if adapters and fulls:
                lines.append(f"{source}: no adapter trains <= {ADAPTER_SHARE:g}% of the model "
                             "-> NOT met")
            continue
        # Both chosen on validation, never on the test scores they are compared by.
        best = max(small, key=validation)
        full = max(fulls, key=validation)  # the reference: full fine-tuning at its best setting
        ratio = mean(best) / mean(full)
        line = (f"{source}: best adapter <= {ADAPTER_SHARE:g}%: {best['method']} "
                f"({best['trainable %']}%) {mean(best):.4f} = {ratio:.1%} of full fine-tuning "
                f"({full['method']}, {mean(full):.4f}) -> "
                f"{'met' if ratio >= 1 else 'NOT met'} (target >= 100%)")
        if scratches:
            scratch = max(scratches, key=validation)
            gain = mean(best) / mean(scratch)
            line += (f"; {gain:.2f}x from scratch ({scratch['method']}, {mean(scratch):.4f})"
                     f" -> {'met' if gain >= 1.1 else 'NOT met'} (target >= 1.1x)")
        lines.append(line)
    return lines


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Test NDCG@10 (mean, sample sd as error bars) against trainable % (log scale), one
    colour per source; rows that train nothing are horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sources = list(dict.fromkeys(row["source"] for row in rows if row["percent"] > 0))
    for row in rows:
        value = mean(row)
        sd = statistics.stdev(row["ndcg"]) if len(row["ndcg"]) > 1 else 0.0
        if row["percent"] <= 0:  # zero-shot, popularity: nothing trained
            axis.axhline(value, linestyle=":", color="grey", linewidth=1)
            label = row["method"] if row["source"] == "-" else f"{row['source']} {row['method']}"
            axis.annotate(label, (0.01, value),
                          xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                          va="bottom")
            continue
        colour = colours[sources.index(row["source"]) % len(colours)]
        axis.errorbar(row["percent"], value, yerr=sd, fmt="o", color=colour, capsize=3)
        axis.annotate(row["method"], (row["percent"], value), fontsize=6,
                      xytext=(4, 2), textcoords="offset points")
    for index, source in enumerate(sources):
        axis.plot([], [], "o", color=colours[index % len(colours)], label=source)
    axis.axvline(ADAPTER_SHARE, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (% of the model, log scale)")
    axis.set_ylabel("test NDCG@10 (mean ± sd over seeds)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True,
                        help="LABEL=RUN_DIR (repeatable): a pretraining run, named LABEL in "
                        "the table; its rows follow its kind (ID, text, text+id or DiffRec)")
    parser.add_argument("--target", default="ml-100k")
    parser.add_argument("--match-items-by", metavar="FIELDS",
                        help="item fields shared by source and target (e.g. "
                        "movie_title,release_year): adds the rows that carry matched items")
    parser.add_argument("--single-seed", nargs="*", default=[],
                        help="grid rows run with the first seed only (expensive ones)")
    add_run_arguments(parser, "runs/bench-transfer")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    sources = dict(item.split("=", 1) for item in args.source)
    # Every source is checked before the first (hours-long) run starts.
    kinds = {label: source_kind(Path(source)) for label, source in sources.items()}
    rows = []
    for label, source in sources.items():
        for name, script, flags, row_kinds in GRID:
            if kinds[label] not in row_kinds or (args.only is not None and name not in args.only):
                continue
            if MATCH in flags:
                if not args.match_items_by:
                    continue
                flags = [args.match_items_by if flag == MATCH else flag for flag in flags]
            # Zero-shot is deterministic: one evaluation.
            single = name.startswith("zero-shot") or name in args.single_seed
            seeds = args.seeds[:1] if single else args.seeds
            folder = run_folder(name)
            run_dirs = {seed: args.output_dir / label / folder / f"seed{seed}" for seed in seeds}
            if args.summary_only:
                run_dirs = {seed: path for seed, path in run_dirs.items()
                            if (path / "metrics.json").is_file()}
                if not run_dirs:
                    continue
            runs = [run_one(script, flags, Path(source), run_dir, seed, args.target, extra)
                    for seed, run_dir in run_dirs.items()]
            rows.append(summarize(label, name, runs, list(run_dirs.values())))
    if rows:
        rows.append(popularity(args.target))
    table = markdown(rows, COLUMNS)
    targets = check_targets(rows)
    report = table + "\n\n" + "\n".join(f"- {line}" for line in targets) + "\n"
    settings = {"target": args.target, "sources": sources, "seeds": args.seeds,
                "match_items_by": args.match_items_by, "extra_flags": extra, "targets": targets}
    path = publish_report(args, rows, report, settings)
    (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    if path is not None:
        plot(rows, f"{', '.join(sources)} -> {args.target}", path.with_suffix(".png"))
        print(f"wrote {path} (+ .json, .png); README blocks: python benchmarks/results.py")


if __name__ == "__main__":
    main()
