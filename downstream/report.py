"""Reports on run folders: `scripts/report.py RUN_OR_SWEEP... --output-dir DIR`.

    write_report(parse_args(report_parser(""), ["runs/bench", "--output-dir", "report"]))

One self-contained HTML file (`report.html`: tables as HTML tables, figures embedded as PNG
data URIs, no external assets) and the same figures as PNG files beside it:

- the results table (validation and test metrics, epochs, checkpoint size) of every run;
- training curves: every loss `log.jsonl` records and validation NDCG@10, per epoch;
- parameters: trainable and total, each split into embedding parameters (nn.Embedding
  tables and per-item parameters) and non-embedding ones; test NDCG@10 against trainable
  parameters for the fine-tuning runs;
- per run, a 2-D map of its catalog's item vectors (the item encoder's, as the scorer sees
  them: ID rows or content vectors): PCA, and t-SNE when scikit-learn is installed,
  coloured by an item field such as genre;
- per run, the statistics that reveal a collapsed embedding space: effective rank, mean
  pairwise cosine, norm spread (`pretraining.model_stats`).

A RUN is a folder with config.json and metrics.json; a SWEEP is any folder with run folders
below it, at any depth (each one reported; an unfinished one, without metrics.json, is
listed and left out). The item maps, embedding statistics and parameter split load each
run's best model on the dataset its config.json records, as `scripts/evaluate.py` does
(adapter runs rebuilt on their base); `--no-models` leaves them out. matplotlib is an
extra: `pip install 'peftrec[report]'`.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from peftrec.adapters.checkpoint import is_adapter_checkpoint
from peftrec.dataset_tools import (
    BUILTIN_DATASETS,
    SequenceData,
    atomic_write,
    load_dataset_folder,
    resolve_dataset,
)
from peftrec.dataset_tools.checkpoints import BEST_DIR, METRICS, RUN_CONFIG
from peftrec.dataset_tools.domains import MULTI_VALUE_SEPARATORS
from peftrec.downstream.transfer import BASELINES, load_any_checkpoint
from peftrec.pretraining.cli import RunSettings, add_settings, cli_parser
from peftrec.pretraining.model_stats import (
    EmbeddingStatistics,
    embedding_statistics,
    parameter_split,
)
from peftrec.pretraining.recommender import WEIGHTS_NAME, first_line

REPORT_HTML = "report.html"
LOG = "log.jsonl"
MATPLOTLIB_MISSING = "report needs matplotlib: pip install 'peftrec[report]'"
COLOR_FIELDS = ("genre", "genres", "class", "category", "categories")  # the default's order
TOP_VALUES = 10  # field values with a colour of their own; the rest are "other"
OTHER, MISSING = "other", "(missing)"
DPI = 100
# Figure sizes in inches (pixels = inches x DPI): fixed, so the PNGs' sizes are known.
CURVES_SIZE = (12.0, 4.5)
TRADEOFF_SIZE = (8.0, 5.0)
MAP_PANEL_SIZE = (6.0, 5.0)  # one panel per projection: PCA, then t-SNE
# Ten colours for the most frequent field values (tab10 with black for its grey, which
# is too close to the light grey of "other").
PALETTE = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "black", "C8", "C9")
MAX_LEGEND_ENTRIES = 16  # more lines than this: no legend (the table names the runs)
METRIC = "ndcg@10"


class ReportError(ValueError):
    """Bad input to the report: not a run, a run the report cannot read; one line."""


# --- the runs -----------------------------------------------------------------------------


@dataclass
class ReportRun:
    """A run folder as read from its files (no model loaded)."""

    path: Path
    label: str  # unique among the runs reported: the folder, relative to the argument
    config: dict
    metrics: dict
    log: list[dict]

    @property
    def method(self) -> str:
        """`pretraining`, or the fine-tuning method (an adapter method or a baseline)."""
        transfer = self.config.get("transfer")
        return transfer.get("method", "fine-tuning") if isinstance(transfer, dict) \
            else "pretraining"


@dataclass
class ModelView:
    """What a run's best model says: its parameters and its catalog's item vectors."""

    parameters: dict[str, int]
    vectors: np.ndarray | None  # [items, d] float32 (item i at row i - 1); None once drawn
    statistics: EmbeddingStatistics
    color_field: str | None
    colors: list[str] | None  # per item: its field's (first) value, top values or "other"


@dataclass
class Report:
    """What `write_report` wrote, for callers and tests."""

    html: Path
    figures: dict[str, Path] = field(default_factory=dict)  # section -> PNG
    runs: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # "PATH: why"


def is_run_folder(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() and (path / METRICS).is_file()


def is_checkpoint_folder(path: Path) -> bool:
    """A best_model/ (full or adapter checkpoint): its config.json is the model's."""
    return (path / WEIGHTS_NAME).is_file() or is_adapter_checkpoint(path)


def find_runs(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """The run folders named by `paths` (runs, or sweeps: folders with runs below them, at
    any depth) with a unique label each, and the unfinished runs found in sweeps ("PATH:
    why", left out). A path that is neither a run nor holds one is an error naming it."""
    found: list[tuple[Path, str]] = []
    left_out: list[str] = []
    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            raise ReportError(f"{root}: no such folder; pass run folders or folders of runs")
        if is_run_folder(root):
            found.append((root, root.absolute().name))
            continue
        if is_checkpoint_folder(root):
            raise ReportError(f"{root} is a checkpoint folder, not a run folder; pass the run "
                              f"folder that holds it ({root.absolute().parent})")
        if (root / RUN_CONFIG).is_file():
            raise ReportError(f"{root} is an unfinished run (config.json but no {METRICS}); "
                              "report it when it has finished")
        before = len(found)
        for run, finished in _walk_runs(root):
            if finished:
                found.append((run, f"{root.absolute().name}/{run.relative_to(root).as_posix()}"))
            else:
                left_out.append(f"{run}: unfinished (no {METRICS})")
        if len(found) == before:
            raise ReportError(f"{root} is not a run folder (no {RUN_CONFIG} and {METRICS}) and "
                              "holds none below it; pass run folders or folders of runs")
    once: dict[Path, tuple[Path, str]] = {}  # a run named twice (itself, in a sweep) once
    for run, label in found:
        once.setdefault(run.resolve(), (run, label))
    found = list(once.values())
    # Runs named alike (two "seed0" folders given directly) are labelled by their paths.
    counts: dict[str, int] = {}
    for _, label in found:
        counts[label] = counts.get(label, 0) + 1
    found = [(run, label if counts[label] == 1 else run.as_posix()) for run, label in found]
    seen: dict[str, int] = {}
    unique = []
    for run, label in found:
        seen[label] = seen.get(label, 0) + 1
        unique.append((run, label if seen[label] == 1 else f"{label} #{seen[label]}"))
    return unique, left_out


def _walk_runs(root: Path) -> Iterator[tuple[Path, bool]]:
    """(folder, finished) for every run folder below `root`, not descending into runs."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        if RUN_CONFIG in files and not is_checkpoint_folder(Path(directory)):
            subdirs[:] = []  # a run's best_model/ and state/ hold no runs
            yield Path(directory), METRICS in files


def read_run(path: Path, label: str) -> ReportRun:
    """A run folder's config.json, metrics.json and log.jsonl. What the report needs and a
    run folder of another schema lacks is an error naming the file and the key; what
    older runs lack (metrics.json's `parameters`, `training`, log.jsonl itself) is left
    blank."""
    config = _read_json(path / RUN_CONFIG)
    metrics = _read_json(path / METRICS)
    if not isinstance(config.get("dataset"), dict) or "path" not in config["dataset"]:
        raise ReportError(_schema_message(path / RUN_CONFIG, "dataset.path"))
    if not isinstance(config.get("model"), dict):
        raise ReportError(_schema_message(path / RUN_CONFIG, "model"))
    for split in ("valid", "test"):
        if not isinstance(metrics.get(split), dict) or METRIC not in metrics[split]:
            raise ReportError(_schema_message(path / METRICS, f"{split}.{METRIC}"))
    return ReportRun(path, label, config, metrics, _read_log(path / LOG))


def _schema_message(file: Path, key: str) -> str:
    return (f"{file}: no {key!r}; a run folder of another schema (an older or newer "
            "peftrec)? The report reads config.json's dataset and model sections and "
            "metrics.json's valid and test metrics; leave this run out")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_log(path: Path) -> list[dict]:
    """log.jsonl's rows (none when the run has no log: a zero-shot run)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path} line {number}: expected a JSON object per epoch")
        rows.append(row)
    return rows


def logged_losses(rows: list[dict]) -> list[str]:
    """The losses log.jsonl records (numeric top-level keys with "loss" in their name, such
    as `train_loss`), in the order they first appear."""
    names: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if "loss" in key and _is_number(value):
                names[key] = None
    return list(names)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- the models ---------------------------------------------------------------------------


def run_data(run: ReportRun, cache_dir: Path | None) -> SequenceData:
    """The dataset a run trained on: the folder its config.json records, or, when that
    folder is gone, the built-in of that name (prepared again)."""
    section = run.config["dataset"]
    recorded, name = Path(str(section["path"])), str(section.get("name", ""))
    source = recorded if recorded.is_dir() or name not in BUILTIN_DATASETS else name
    return load_dataset_folder(resolve_dataset(source, cache_dir))


def model_view(run: ReportRun, args: argparse.Namespace,
               datasets: dict[str, SequenceData] | None = None) -> ModelView | None:
    """Load the run's best model on its dataset and read its parameters and item vectors;
    None when the run has no checkpoint (nothing trained: a zero-shot run). `datasets`:
    datasets already loaded, by recorded path (runs of a sweep share them)."""
    checkpoint = run.path / BEST_DIR
    if not checkpoint.is_dir():
        return None
    datasets = {} if datasets is None else datasets
    try:
        key = str(run.config["dataset"]["path"])
        if key not in datasets:
            datasets[key] = run_data(run, args.cache_dir)
        data = datasets[key]
        model = load_any_checkpoint(checkpoint, data, args.encoder_cache_dir)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        raise ReportError(f"{run.path}: its best model does not load ({first_line(error)}); "
                          "pass --no-models to report it without item maps, embedding "
                          "statistics and parameter split") from None
    model = model.cpu().eval()
    with torch.no_grad():
        vectors = model.item_encoder.catalog()[1:].detach().float()
    color_field, colors = item_colors(data, args.color_field, run.path)
    return ModelView(parameter_split(model), vectors.numpy(), embedding_statistics(vectors),
                     color_field, colors)


def item_colors(data: SequenceData, wanted: str | None,
                run: Path) -> tuple[str | None, list[str] | None]:
    """(field, one label per item): the item field `wanted` (default: the first of
    COLOR_FIELDS the item table has), each item's value, or of a multi-valued one
    ("Action|Comedy", "Comedy Romance") its first; the TOP_VALUES most frequent keep their
    name, the rest are "other". (None, None) when no default field exists."""
    columns = list(data.items.column_names)
    if wanted is None:
        wanted = next((name for name in COLOR_FIELDS if name in columns), None)
        if wanted is None:
            return None, None
    elif wanted not in columns:
        shown = [name for name in columns if name != "item_id"]
        raise ReportError(f"--color-field {wanted!r}: not a column of the item table of "
                          f"{run}'s dataset ({data.path}); it has {shown}")
    values = []
    for raw in data.items[wanted]:
        text = "" if raw is None else str(raw).strip()
        first = MULTI_VALUE_SEPARATORS.split(text, maxsplit=1)[0] if text else ""
        values.append(first or MISSING)
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    kept = set(sorted(counts, key=lambda value: (-counts[value], value))[:TOP_VALUES])
    return wanted, [value if value in kept else OTHER for value in values]


# --- figures (matplotlib, imported here only) ---------------------------------------------


def _figure(size: tuple[float, float], columns: int = 1):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend) and its axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(MATPLOTLIB_MISSING) from None
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError(MATPLOTLIB_MISSING)


def curves_figure(runs: list[ReportRun]) -> bytes | None:
    """Left: every logged loss per epoch; right: validation NDCG@10 per epoch. One line per
    run (and loss). None when no run has a log."""
    if not any(run.log for run in runs):
        return None
    figure, (losses, ndcg) = _figure(CURVES_SIZE, columns=2)
    lines = 0
    for run in runs:
        for name in logged_losses(run.log):
            points = [(row.get("epoch", number), row[name])
                      for number, row in enumerate(run.log, start=1) if _is_number(row.get(name))]
            if points:
                losses.plot(*zip(*points, strict=True), marker=".",
                            label=run.label if name == "train_loss" else f"{run.label} {name}")
                lines += 1
        points = [(row.get("epoch", number), row["valid"][METRIC])
                  for number, row in enumerate(run.log, start=1)
                  if isinstance(row.get("valid"), dict) and _is_number(row["valid"].get(METRIC))]
        if points:
            ndcg.plot(*zip(*points, strict=True), marker=".", label=run.label)
    losses.set(title="training losses", xlabel="epoch", ylabel="loss")
    ndcg.set(title=f"validation {METRIC.upper()}", xlabel="epoch", ylabel=METRIC)
    from matplotlib.ticker import MaxNLocator

    for axes in (losses, ndcg):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        axes.grid(alpha=0.3)
        if 0 < len(axes.get_lines()) <= MAX_LEGEND_ENTRIES:
            axes.legend(fontsize="x-small")
    return _png(figure)


def tradeoff_figure(rows: list[dict]) -> bytes | None:
    """Test NDCG@10 against trainable parameters (log scale) for fine-tuning runs that
    trained something, one marker colour per method. None when there are none."""
    rows = [row for row in rows if row["method"] != "pretraining" and row["trainable"]]
    if not rows:
        return None
    figure, (axes,) = _figure(TRADEOFF_SIZE)
    for method in sorted({row["method"] for row in rows}):
        chosen = [row for row in rows if row["method"] == method]
        axes.scatter([row["trainable"] for row in chosen], [row["test"] for row in chosen],
                     label=method, marker="s" if method in BASELINES else "o", s=40)
        if len(rows) <= MAX_LEGEND_ENTRIES:
            for row in chosen:
                axes.annotate(row["label"], (row["trainable"], row["test"]), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set(title=f"test {METRIC.upper()} against trainable parameters",
             xlabel="trainable parameters (log scale)", ylabel=f"test {METRIC}")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _png(figure)


def has_tsne() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def map_panels() -> int:
    """Panels of an item map: PCA, and t-SNE when scikit-learn is installed."""
    return 2 if has_tsne() else 1


def item_map_figure(label: str, view: ModelView, max_items: int, seed: int) -> bytes:
    """The catalog's item vectors in 2-D: PCA (fitted on every item), and t-SNE when
    scikit-learn is installed, of at most `max_items` items sampled with `seed`, coloured by
    the item field."""
    vectors = view.vectors
    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(len(vectors), min(max_items, len(vectors)), replace=False))
    sample = vectors[shown].astype(np.float64)
    mean, axes = pca_axes(vectors)
    projections = [("PCA", (sample - mean) @ axes)]
    if has_tsne() and len(shown) >= 5:
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, init="pca", random_state=seed,
                    perplexity=min(30.0, (len(shown) - 1) / 3))
        projections.append(("t-SNE", tsne.fit_transform(sample)))
    figure, panels = _figure((MAP_PANEL_SIZE[0] * map_panels(), MAP_PANEL_SIZE[1]),
                             columns=map_panels())
    colors = None if view.colors is None else np.asarray(view.colors, dtype=object)[shown]
    for axes, (name, points) in zip(panels, projections, strict=False):
        if colors is None:
            axes.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
        else:
            counts = {value: int((colors == value).sum()) for value in set(colors)}
            values = sorted(counts, key=lambda v: (v in (OTHER, MISSING), -counts[v], v))
            for number, value in enumerate(values):
                chosen = colors == value
                color = "lightgrey" if value in (OTHER, MISSING) else PALETTE[number % 10]
                axes.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, color=color,
                             label=f"{value} ({counts[value]})")
            axes.legend(fontsize="xx-small", markerscale=2, title=view.color_field,
                        title_fontsize="x-small")
        axes.set(title=f"{label}: {name}", xticks=[], yticks=[])
    for axes in panels[len(projections):]:  # too few items for t-SNE
        axes.set_axis_off()
    return _png(figure)


def pca_axes(vectors: np.ndarray, chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], the two leading principal axes [d, 2]) of `vectors` [n, d], from the
    covariance summed over row chunks (no float64 copy of a big catalog). With width 1 the
    second axis is zero."""
    mean = vectors.mean(axis=0, dtype=np.float64)
    scatter = np.zeros((vectors.shape[1], vectors.shape[1]))
    for start in range(0, len(vectors), chunk_rows):
        chunk = vectors[start:start + chunk_rows].astype(np.float64) - mean
        scatter += chunk.T @ chunk
    _, eigenvectors = np.linalg.eigh(scatter)  # ascending eigenvalues
    axes = eigenvectors[:, ::-1][:, :2]
    return mean, np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))


# --- tables and the HTML page -------------------------------------------------------------


def result_row(run: ReportRun, view: ModelView | None) -> dict:
    """One run's line of the results and parameters tables (None where unknown)."""
    recorded = run.metrics.get("parameters") or {}
    counted = view.parameters if view is not None else {}
    training = run.metrics.get("training") or {}
    trainable = recorded.get("trainable", counted.get("trainable"))
    total = recorded.get("total", counted.get("total"))
    model = run.config["model"]
    return {
        "label": run.label, "method": run.method,
        "dataset": run.config["dataset"].get("name", ""),
        "backbone": model.get("backbone", ""), "item encoder": model.get("item_encoder", ""),
        "epochs": training.get("epochs", len(run.log) or None),
        "best epoch": training.get("best_epoch"),
        "valid": run.metrics["valid"][METRIC], "test": run.metrics["test"][METRIC],
        "test hr@10": run.metrics["test"].get("hr@10"), "test mrr": run.metrics["test"].get("mrr"),
        "checkpoint MB": run.metrics.get("checkpoint_mb"),
        "trainable": trainable, "total": total,
        "trainable %": 100.0 * trainable / total if trainable is not None and total else None,
        **{name: counted.get(key) for name, key in (
            ("embedding", "embedding"), ("non-embedding", "non_embedding"),
            ("trainable embedding", "trainable_embedding"),
            ("trainable non-embedding", "trainable_non_embedding"))},
    }


RESULT_COLUMNS = ("label", "method", "dataset", "backbone", "item encoder", "epochs",
                  "best epoch", "valid", "test", "test hr@10", "test mrr", "checkpoint MB")
RESULT_HEADERS = {"label": "run", "valid": f"valid {METRIC}", "test": f"test {METRIC}"}
PARAMETER_COLUMNS = ("label", "method", "trainable", "total", "trainable %", "embedding",
                     "non-embedding", "trainable embedding", "trainable non-embedding")
STATISTIC_COLUMNS = ("run", "items", "width", "effective rank", "effective rank / width",
                     "mean pairwise cosine", "norm mean", "norm sd", "norm min", "norm max",
                     "norm sd / mean")


def statistics_row(label: str, stats: EmbeddingStatistics) -> dict:
    return {"run": label, "items": stats.num_vectors, "width": stats.dim,
            "effective rank": stats.effective_rank,
            "effective rank / width": stats.effective_rank / stats.dim,
            "mean pairwise cosine": stats.mean_cosine, "norm mean": stats.norm_mean,
            "norm sd": stats.norm_std, "norm min": stats.norm_min, "norm max": stats.norm_max,
            "norm sd / mean": stats.norm_cv}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def html_table(table_id: str, rows: list[dict], columns: Sequence[str],
               headers: dict[str, str] | None = None) -> str:
    headers = headers or {}
    head = "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                   + "</tr>\n" for row in rows)
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody></table>")


def _image(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
            f'data-file="{html.escape(name)}"><figcaption>{html.escape(name)}</figcaption>'
            "</figure>")


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;color:#555}
.note{color:#555;font-size:13px}"""


def _section(section_id: str, title: str, *parts: str) -> str:
    return f'<section id="{section_id}">\n<h2>{html.escape(title)}</h2>\n' + \
        "\n".join(parts) + "\n</section>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# --- the job ------------------------------------------------------------------------------


def write_report(args: argparse.Namespace) -> Report:
    """scripts/report.py: read the runs, load their models, write the PNGs and report.html
    into `args.output_dir` (each file written to a temporary sibling and renamed into
    place, report.html last). Bad input raises ReportError (one line) before anything is
    written."""
    require_matplotlib()
    if args.max_map_items < 2:
        raise ReportError(f"--max-map-items must be >= 2, got {args.max_map_items}")
    found, left_out = find_runs(args.runs)
    runs = [read_run(path, label) for path, label in found]
    figures: dict[str, tuple[str, bytes]] = {}  # key -> (file name, PNG)
    names = {"curves.png", "ndcg-vs-trainable.png"}
    datasets: dict[str, SequenceData] = {}
    views: dict[str, ModelView | None] = {}
    for run in runs:  # one model at a time: its item map drawn, its vectors dropped
        view = views[run.label] = model_view(run, args, datasets) if args.models else None
        if view is not None:
            figures[f"items:{run.label}"] = (_file_name(run.label, names), item_map_figure(
                run.label, view, args.max_map_items, args.seed))
            view.vectors = None
        elif args.models:
            left_out.append(f"{run.path}: no {BEST_DIR}/ (nothing trained, e.g. zero-shot): "
                            "no item map, embedding statistics or parameter split")
    rows = [result_row(run, views[run.label]) for run in runs]
    curves = curves_figure(runs)
    if curves is not None:
        figures["curves"] = ("curves.png", curves)
    tradeoff = tradeoff_figure(rows)
    if tradeoff is not None:
        figures["trainable"] = ("ndcg-vs-trainable.png", tradeoff)

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = Report(output / REPORT_HTML, runs=[run.label for run in runs], left_out=left_out)
    for key, (name, png) in figures.items():
        atomic_write(output / name, png)
        report.figures[key] = output / name
    page = render_html(args, runs, rows, views, figures, left_out)
    atomic_write(report.html, page.encode("utf-8"))
    print(f"{report.html}: {len(runs)} run(s), {len(figures)} figure(s)"
          + (f"; left out: {len(left_out)}" if left_out else ""), file=sys.stderr)
    return report


def render_html(args: argparse.Namespace, runs: list[ReportRun], rows: list[dict],
                views: dict[str, ModelView | None],
                figures: dict[str, tuple[str, bytes]], left_out: list[str]) -> str:
    def figure(key: str, alt: str, missing: str) -> str:
        if key not in figures:
            return _note(missing)
        return _image(figures[key][0], figures[key][1], alt)

    shown = [(run, views[run.label]) for run in runs if views[run.label] is not None]
    maps = [figure(f"items:{run.label}", f"item map of {run.label}", "") for run, _ in shown]
    fields = sorted({view.color_field or "none" for _, view in shown})
    statistics = [statistics_row(run.label, view.statistics) for run, view in shown]
    unavailable = ("--no-models: item maps, embedding statistics and the parameter split "
                   "were left out" if not args.models else "no run has a best model")
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        _section("results", "Results",
                 _note(f"{len(runs)} run(s); best checkpoint on validation {METRIC}, "
                       "tested by full ranking (metrics.json)."),
                 html_table("results-table", rows, RESULT_COLUMNS, RESULT_HEADERS)),
        _section("curves", "Training curves",
                 figure("curves", "training curves", "no run has a log.jsonl")),
        _section("parameters", "Parameters",
                 _note("Trainable and total as metrics.json records them (else counted on "
                       "the loaded model); embedding = nn.Embedding tables (item IDs, "
                       "positions, token embeddings) and per-item parameters (item bias, "
                       "untied output table), non-embedding = the rest, counted on the "
                       "loaded best model."),
                 html_table("parameters-table", rows, PARAMETER_COLUMNS, RESULT_HEADERS),
                 figure("trainable", f"test {METRIC} against trainable parameters",
                        "no fine-tuning run that trained parameters")),
        _section("item-maps", "Item vectors",
                 _note("The catalog's item vectors (the item encoder's), PCA"
                       + (" and t-SNE" if has_tsne() else " (t-SNE: install scikit-learn)")
                       + f", at most {args.max_map_items} items each (seed {args.seed}); "
                       f"coloured by {', '.join(fields) if fields else 'nothing'}, "
                       f"the {TOP_VALUES} most frequent values, the rest '{OTHER}'.")
                 if shown else _note(unavailable), *maps),
        _section("embedding-statistics", "Embedding statistics",
                 _note("Effective rank: exp of the entropy of the normalised singular "
                       "values (Roy & Vetterli 2007), 1 = all items on one line, the width = "
                       "evenly spread; mean cosine over all pairs of distinct items (near 1: "
                       "a collapsed space); norm spread (a few long vectors out-score the "
                       "rest)."),
                 html_table("statistics-table", statistics, STATISTIC_COLUMNS)
                 if statistics else _note(unavailable)),
    ]
    if left_out:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in left_out)
        sections.append(_section("left-out", "Left out", f"<ul>{items}</ul>"))
    command = " ".join(["scripts/report.py", *map(str, args.runs),
                        "--output-dir", str(args.output_dir)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>peftrec report</title><style>{STYLE}</style></head><body>\n"
            f"<h1>peftrec report</h1>\n{_note(f'{command} ({created})')}\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _file_name(label: str, taken: set[str]) -> str:
    """`items-<label>.png` with the label made a safe file name, unique among `taken`."""
    stem = "items-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "run")
    name, number = f"{stem}.png", 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}.png"
    taken.add(name)
    return name


@dataclass(kw_only=True)
class ReportSettings:
    """The settings of scripts/report.py of its own (a flag each, pretraining.cli)."""

    runs: tuple[Path, ...] = field(metadata={
        "positional": True, "metavar": "RUN_OR_SWEEP",
        "help": "run folders, or folders with run folders below them"})
    output_dir: Path = field(metadata={"help": f"where {REPORT_HTML} and its PNGs are written"})
    color_field: str | None = field(default=None, metadata={
        "metavar": "FIELD",
        "help": "item field the item maps are coloured by (default: the first of "
        f"{', '.join(COLOR_FIELDS)} the item table has)"})
    max_map_items: int = field(default=2000, metadata={
        "metavar": "N", "help": "items drawn per item map (sampled; PCA is fitted on all)"})
    models: bool = field(default=True, metadata={
        "help": "load the runs' models for the item maps, embedding statistics and parameter "
        "split (--no-models: leave them out)"})
    seed: int = field(default=0, metadata={"help": "sampling of the item maps, t-SNE"})


def report_parser(description: str) -> argparse.ArgumentParser:
    """Flags of scripts/report.py."""
    parser = cli_parser(description)
    add_settings(parser, ReportSettings, exclude=("seed",))
    add_settings(parser, RunSettings, ("encoder_cache_dir", "cache_dir"))
    add_settings(parser, ReportSettings, ("seed",))
    return parser
