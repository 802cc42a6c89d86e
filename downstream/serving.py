"""Recommendations from a run folder: `load_run(DIR).recommend(histories, k)`.

    runner = load_run("runs/ml-100k-sasrec")
    runner.recommend([["Star Wars (1977)", "Fargo (1996)"]], k=10)  # original ids in, out
    # [[{"item_id": "Pulp Fiction (1994)", "score": 0.70, "title": "Pulp Fiction"}, ...]]

Any run folder loads, the way `scripts/evaluate.py` loads it (a pretraining run, a full
fine-tuning run, an adapter run rebuilt on its base), on the dataset it was trained on, with
any backbone. Candidates are ranked as evaluation ranks them, by one code path: the model's
`query` once per batch of histories, then `score_items` over the catalog one chunk of
`item_chunk_size` items at a time, merged into a running top-k
(`pretraining.evaluation.top_k_items`): memory is bounded by batch x (chunk + k), never
by batch x catalog, and the result does not depend on the chunk size. Histories are batched
by length (less padding); a history's recommendations do not depend on its batch (up to
float rounding: the backbones mask padding and count positions from the right).

- A history is a list of original item ids (the `item_id` column of the item table), oldest
  first; the model reads its last `max_len` items. An id the catalog lacks is an error that
  names it (not skipped: a silently shortened history would change the recommendations
  without a word).
- `exclude_history`: no item of the history is recommended (the whole history, not only
  the last `max_len` items); fewer than k items come back when fewer remain.
- A user's history (`histories_of`) is everything the dataset knows: train + valid + test.
- Each recommendation is `{"item_id", "score", "title"}` (`title` where the item table has
  a `title` or `movie_title` column), best first. The score is the one evaluation ranks by:
  the dot product (+ repeat bias) for SASRec, the log of the seed-averaged probability for
  DiffRec.
- A new catalog (`items`, content item encoders only): the model's item encoder encodes the
  items of an item table it never trained on, and only those are ranked; histories then
  name that table's ids. Per-item parameters (the ID part of a content + ID encoder, a
  generative item bias, an untied output table) start as on any fresh catalog, as in
  zero-shot transfer: zero, or the content vectors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from peftrec.adapters import get_adapted_model
from peftrec.adapters.checkpoint import is_adapter_checkpoint, read_adapter_config
from peftrec.dataset_tools import (
    DataError,
    ItemTextTemplate,
    SequenceData,
    atomic_write,
    read_items,
)
from peftrec.downstream.transfer import load_any_checkpoint
from peftrec.modality_encoders import item_encoder_modality, item_table_content
from peftrec.pretraining.cli import CommandLineError, RunSettings, add_settings, base_parser
from peftrec.pretraining.data import collate_left_padded
from peftrec.pretraining.evaluation import EvaluationProtocol, top_k_items
from peftrec.pretraining.pipeline import run_dataset
from peftrec.pretraining.recommender import CheckpointError, SequentialRecommender
from peftrec.pretraining.trainer import BEST_DIR, TrainingConfig

TITLE_COLUMNS = ("title", "movie_title")  # the first one an item table has names its items
ITEM_TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
HISTORY_FIELDS = ("user", "items")


@dataclass
class Catalog:
    """The items a runner ranks: original ids (row i - 1 = item index i) and titles."""

    item_ids: list[str]
    titles: list[str] | None
    source: str  # where the items come from, for messages

    def __post_init__(self) -> None:
        self.index = {item: position + 1 for position, item in enumerate(self.item_ids)}

    @classmethod
    def from_table(cls, items: pd.DataFrame, source: str) -> Catalog:
        title = next((column for column in TITLE_COLUMNS if column in items.columns), None)
        return cls(items["item_id"].astype(str).tolist(),
                   None if title is None else items[title].astype(str).tolist(), source)


class RunRecommender:
    """A loaded run that recommends (see the module docstring); made by `load_run`."""

    def __init__(self, model: SequentialRecommender, data: SequenceData, catalog: Catalog,
                 item_chunk_size: int, batch_size: int) -> None:
        if item_chunk_size < 1 or batch_size < 1:
            raise ValueError(f"--item-chunk-size and --eval-batch-size must be >= 1, got "
                             f"{item_chunk_size} and {batch_size}")
        self.model, self.data, self.catalog = model.eval(), data, catalog
        self.item_chunk_size, self.batch_size = item_chunk_size, batch_size
        self.max_len = model.config.backbone_settings().max_len
        self.device = next(model.parameters()).device
        self._users: dict[str, int] | None = None
        self._dataset_items: list[str] | None = None

    def histories_of(self, users: Sequence[str]) -> list[list[str]]:
        """Each user's whole known sequence (train + valid + test) as original item ids."""
        if self._users is None:
            self._users = {user: row for row, user in enumerate(self.data.sequences["user_id"])}
            self._dataset_items = [str(item) for item in self.data.items["item_id"]]
        unknown = [user for user in users if str(user) not in self._users]
        if unknown:
            examples = ", ".join(map(repr, list(self._users)[:3]))
            raise DataError(f"unknown user {unknown[0]!r}: not in {self.data.path} (its users "
                            f"are ids like {examples}); pass users of the run's dataset, or "
                            "their items with --histories")
        rows = [self._users[str(user)] for user in users]
        sequences = self.data.sequences.select([*rows]).with_format("numpy")["item_indices"]
        return [[self._dataset_items[index - 1] for index in sequence] for sequence in sequences]

    @torch.no_grad()
    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_history: bool = False,
                  labels: Sequence[str] | None = None) -> list[list[dict]]:
        """The k best items for each history (original item ids, oldest first), best first:
        one list of `{"item_id", "score"[, "title"]}` per history. `labels` name the
        histories in error messages (default: "history 1", ...)."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (--k), got {k}")
        labels = list(labels) if labels is not None else [
            f"history {number + 1}" for number in range(len(histories))]
        rows = [self._item_indices(history, label)
                for history, label in zip(histories, labels, strict=True)]
        # Batches of similar length: less padding to run through the backbone.
        order = sorted(range(len(rows)), key=lambda row: min(len(rows[row]), self.max_len))
        results: list[list[dict]] = [[] for _ in rows]
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            top = self._top_k([rows[row] for row in batch], k, exclude_history)
            for row, items in zip(batch, top, strict=True):
                results[row] = items
        return results

    def _item_indices(self, history: Sequence[str], label: str) -> list[int]:
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise DataError(f"{label}: a history is a list of item ids, got "
                            f"{type(history).__name__}")
        if not history:
            raise DataError(f"{label}: the history is empty; a recommendation needs at least "
                            "one item the user interacted with")
        indices = []
        for item in history:
            index = self.catalog.index.get(str(item))
            if index is None:
                raise DataError(f"{label}: unknown item id {str(item)!r} (not in the "
                                f"{len(self.catalog.item_ids)} items of {self.catalog.source});"
                                " remove it, or pass the item table that holds it (--items)")
            indices.append(index)
        return indices

    def _top_k(self, rows: list[list[int]], k: int, exclude_history: bool) -> list[list[dict]]:
        def padded(sequences: list[list[int]]) -> torch.Tensor:
            examples = [{"ids": np.asarray(sequence, dtype=np.int64)} for sequence in sequences]
            return collate_left_padded(examples)["ids"].to(self.device)

        query = self.model.query({"input_ids": padded([row[-self.max_len:] for row in rows])})
        scores, items = top_k_items(self.model, query, k, self.item_chunk_size,
                                    padded(rows) if exclude_history else None)
        titles = self.catalog.titles
        results = []
        for row_scores, row_items in zip(scores.tolist(), items.tolist(), strict=True):
            results.append([
                {"item_id": self.catalog.item_ids[item - 1], "score": score,
                 **({"title": titles[item - 1]} if titles is not None else {})}
                for score, item in zip(row_scores, row_items, strict=True)
                if score != float("-inf")])  # excluded items, when fewer than k remain
        return results


def load_run(
    run: str | Path,
    dataset: str | None = None,
    cache_dir: Path | None = None,
    encoder_cache_dir: Path | None = None,
    items: str | Path | None = None,
    item_col: str = "item_id",
    item_chunk_size: int = EvaluationProtocol.item_chunk_size,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> RunRecommender:
    """The best checkpoint of a run folder, ready to `recommend`.

    `dataset`: the run's dataset if it moved (default: the one config.json records);
    `items`: an item table (.csv, .tsv, .jsonl; ids in `item_col`) to recommend among
    instead of the dataset's catalog (content item encoders only); `device`: default the
    GPU when there is one."""
    run = Path(run)
    data = run_dataset(run, dataset, cache_dir)
    checkpoint = run / BEST_DIR
    model = load_any_checkpoint(checkpoint, data, encoder_cache_dir)
    if items is None:
        catalog = Catalog.from_table(data.items.to_pandas(), str(data.path))
    else:
        table = read_item_table(Path(items), item_col, model)
        catalog = Catalog.from_table(table, str(items))
        fingerprint = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
        content = item_table_content(table, fingerprint,
                                     encoder_cache_dir or Path(data.path) / "cache",
                                     model.config.item_encoder, model.config.item_encoder_config)
        model = model_on_catalog(model, checkpoint, content)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RunRecommender(model.to(device), data, catalog, item_chunk_size, batch_size)


def read_item_table(path: Path, item_col: str, model: SequentialRecommender) -> pd.DataFrame:
    """`--items`: an item table for `model`'s content encoder, with `item_id` (each id once:
    the first row wins, as in a dataset folder) and the columns its text template needs."""
    config = model.config
    modality = item_encoder_modality(config.item_encoder)
    if modality is None:
        raise CommandLineError(
            f"--items {path}: this run's items are learned IDs ({config.item_encoder!r} item "
            "encoder), which cannot score items it never trained on; drop --items, or use a "
            "run with a content item encoder (text or image)")
    fmt = ITEM_TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"--items {path}: unknown format {path.suffix!r}; pass an item table "
                        f"as {', '.join(ITEM_TABLE_FORMATS)}")
    table = read_items(path, fmt, item_col).rename(columns={"item": "item_id"})
    table = table.drop_duplicates("item_id", keep="first").reset_index(drop=True)
    template = config.item_encoder_config.get("template")
    if modality == "text" and template:
        missing = [name for name in ItemTextTemplate(template).fields
                   if name not in table.columns]
        if missing:
            present = [column for column in table.columns if column != "item_id"]
            raise DataError(f"--items {path}: no column {', '.join(map(repr, missing))}, which "
                            f"the run's item text template {template!r} needs (the file has "
                            f"{present}); add it")
    return table


def model_on_catalog(model: SequentialRecommender, checkpoint: Path,
                     content) -> SequentialRecommender:
    """`model` (loaded from `checkpoint`) moved to the catalog of `content`: the same
    architecture (adapters injected as the checkpoint records), every trained tensor but the
    per-item ones, which start fresh."""
    # Serving never trains: the objective is irrelevant, and a new catalog has no popularity.
    config = replace(model.config, num_items=content.num_items,
                     dataset_fingerprint=content.dataset_fingerprint, loss="full",
                     negative_sampling="uniform")
    moved = SequentialRecommender(config, None, content)
    if is_adapter_checkpoint(checkpoint):
        adapter, _ = read_adapter_config(checkpoint)
        if adapter is not None:
            get_adapted_model(moved, adapter)
    per_item = set(moved.catalog_parameter_names())
    state = {name: tensor for name, tensor in model.state_dict().items()
             if name not in per_item}
    missing, unexpected = moved.load_state_dict(state, strict=False)
    if set(missing) - per_item or unexpected:
        raise CheckpointError(f"{checkpoint}: its model does not fit a new catalog (missing "
                              f"{sorted(set(missing) - per_item)[:3]}, unexpected "
                              f"{sorted(unexpected)[:3]})")
    if moved.output_items is not None:  # the new items' vectors, from the trained encoder
        moved.copy_items_to_output()
    return moved.requires_grad_(False)


# --- scripts/recommend.py ----------------------------------------------------------------


@dataclass(kw_only=True)
class RecommendSettings:
    """The settings of scripts/recommend.py of its own (a flag each, pretraining.cli)."""

    run: Path = field(metadata={
        "help": "run folder of a pretraining, full fine-tuning or adapter script"})
    # One of these two: the group is exclusive and required.
    users: tuple[str, ...] | None = field(default=None, metadata={
        "words": True, "metavar": "USER",
        "help": "original user ids of the run's dataset; each one's history is everything the "
        "dataset knows (train + valid + test)"})
    histories: Path | None = field(default=None, metadata={
        "metavar": "FILE",
        "help": 'JSON lines {"user": optional, "items": [item ids, oldest first]}'})
    k: int = field(default=10, metadata={"help": "items recommended per user"})
    exclude_history: bool = field(default=False, metadata={
        "help": "never recommend an item of the history"})
    output: Path = field(metadata={
        "help": 'JSON lines written: {"user", "items": [{"item_id", "score", "title"}, ...]} '
        "per user or history, in input order"})
    items: Path | None = field(default=None, metadata={
        "metavar": "FILE",
        "help": "content models: recommend among the items of this item table (.csv, .tsv or "
        ".jsonl with the columns of the run's text template) instead of the run's catalog; "
        "histories then name its ids"})
    item_col: str = field(default="item_id", metadata={"help": "the --items column of item ids"})


REQUEST_SOURCES = ("users", "histories")


def recommend_parser(description: str) -> argparse.ArgumentParser:
    """Flags of scripts/recommend.py."""
    parser = base_parser(description)
    parser.set_defaults(dataset=None)  # default: the dataset the run was trained on
    add_settings(parser, RecommendSettings, exclude=REQUEST_SOURCES)
    add_settings(parser.add_mutually_exclusive_group(required=True), RecommendSettings,
                 REQUEST_SOURCES)
    add_settings(parser, RunSettings, ("encoder_cache_dir",))
    add_settings(parser, TrainingConfig, ("eval_batch_size", "cpu"))
    add_settings(parser, EvaluationProtocol, ("item_chunk_size",))
    return parser


@dataclass
class HistoryLine:
    user: str | None
    items: list[str]
    label: str  # "FILE line N", for messages


def read_histories(path: Path) -> list[HistoryLine]:
    """`--histories FILE`: one JSON object per line, `items` (a list of item ids) and
    optionally `user`; blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"--histories {path}: no such file")
    lines = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg}); each line holds one "
                                'object {"user": ..., "items": [...]}') from None
            if not isinstance(record, dict) or not isinstance(record.get("items"), list):
                raise DataError(f'{where}: expected {{"user": optional, "items": [item ids]}}, '
                                f"got {raw.strip()[:60]}")
            unknown = sorted(set(record) - set(HISTORY_FIELDS))
            bad = [item for item in record["items"] if not isinstance(item, (str, int))
                   or isinstance(item, bool)]
            if unknown or bad:
                problem = f"unknown fields {unknown}" if unknown else f"item id {bad[0]!r}"
                raise DataError(f'{where}: {problem}; a line holds "items" (a list of string '
                                'or integer ids) and optionally "user"')
            user = record.get("user")
            lines.append(HistoryLine(None if user is None else str(user),
                                     [str(item) for item in record["items"]], where))
    if not lines:
        raise DataError(f"--histories {path}: no histories; write one JSON line per user")
    return lines


def recommend_to_file(args: argparse.Namespace) -> list[dict]:
    """scripts/recommend.py: recommend for `--users` or `--histories`, write `--output`
    (atomically: a reader sees the old file or the whole new one). Returns its lines."""
    if args.k < 1:
        raise CommandLineError(f"--k must be >= 1, got {args.k}")
    if args.output.is_dir():
        raise CommandLineError(f"--output {args.output} is a folder; pass a file name such as "
                               f"{args.output / 'recs.jsonl'}")
    requests = None if args.histories is None else read_histories(args.histories)
    runner = load_run(args.run, args.dataset, args.cache_dir, args.encoder_cache_dir,
                      args.items, args.item_col, args.item_chunk_size, args.eval_batch_size,
                      "cpu" if args.cpu else None)
    if requests is None:
        requests = [HistoryLine(user, history, f"user {user!r}")
                    for user, history in zip(args.users, runner.histories_of(args.users),
                                             strict=True)]
    recommendations = runner.recommend([r.items for r in requests], args.k,
                                       args.exclude_history, [r.label for r in requests])
    lines = [{"user": r.user, "items": items}
             for r, items in zip(requests, recommendations, strict=True)]
    write_jsonl(args.output, lines)
    print(f"{args.output}: top {args.k} items for {len(lines)} "
          f"{'users' if args.users else 'histories'}", file=sys.stderr)
    return lines


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON line per record, written atomically."""
    atomic_write(path, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                               for record in records))
