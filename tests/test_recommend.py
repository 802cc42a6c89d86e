"""Recommendations from run folders: `load_run(DIR).recommend(histories, k)` and
scripts/recommend.py, for ID, text, adapter and DiffRec runs; a text model on a new catalog
(`--items`); bad input as one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftrec.downstream import load_run
from peftrec.pretraining.cli import parse_args, pretrain_parser, run_main
from peftrec.pretraining.pipeline import pretrain
from tests.helpers import MODEL, TRAIN, finetune, load_script, write_items


@pytest.fixture(scope="module")
def runs(tiny_dataset_dir, target_dir, text_base, tmp_path_factory) -> dict[str, tuple]:
    """name -> (run folder, encoder cache or None): one of each kind of run."""
    root = tmp_path_factory.mktemp("recommend_runs")
    text_run, cache = text_base
    for name, flags in (("id", []), ("diffrec", ["--backbone", "diffrec", "--preset", "none",
                                                 "--diffusion-steps", "20", "--num-seeds", "2"])):
        pretrain(parse_args(pretrain_parser("t"), [
            "--dataset", str(tiny_dataset_dir), "--output-dir", str(root / name),
            "--epochs", "1", *flags, *MODEL, *TRAIN]))
    # Houlsby adapters on the text model's backbone, fine-tuned on another catalog.
    finetune(("houlsby",), "--pretrained", str(text_run), "--dataset", str(target_dir),
             "--output-dir", str(root / "adapter"), "--epochs", "1", "--layers", "top:1",
             "--encoder-cache-dir", str(cache))
    return {"id": (root / "id", None), "text": (text_run, cache),
            "adapter": (root / "adapter", cache), "diffrec": (root / "diffrec", None)}


def loaded(runs, name: str, **settings):
    run, cache = runs[name]
    return load_run(run, encoder_cache_dir=cache, device="cpu", **settings)


def first_users(runner, count: int = 6) -> list[str]:
    return list(runner.data.sequences["user_id"])[:count]


def full_scores(runner, histories: list[list[str]]) -> torch.Tensor:
    """The model's own scores of every item [B, N] (no chunks), for the last max_len items."""
    rows = [[runner.catalog.index[item] for item in history][-runner.max_len:]
            for history in histories]
    inputs = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for row, items in enumerate(rows):
        inputs[row, -len(items):] = torch.tensor(items)
    with torch.no_grad():
        return runner.model.scores({"input_ids": inputs})[:, 1:].float()


@pytest.mark.parametrize("name", ["id", "text", "adapter", "diffrec"])
def test_the_top_k_is_the_top_of_the_models_full_score_vector_in_original_ids(runs, name):
    runner = loaded(runs, name, item_chunk_size=7)  # several chunks, the last one partial
    histories = runner.histories_of(first_users(runner))
    recommendations = runner.recommend(histories, k=5)
    scores = full_scores(runner, histories)
    item_ids = runner.catalog.item_ids
    for row, items in enumerate(recommendations):
        expected = scores[row].sort(descending=True, stable=True)
        got = torch.tensor([entry["score"] for entry in items])
        # Scores as the full vector ranks them (ties may come in any order) ...
        torch.testing.assert_close(got, expected.values[:5], rtol=1e-5, atol=1e-5)
        # ... and each returned id is the original id of an item with that score.
        for entry in items:
            assert entry["item_id"] in runner.catalog.index
            index = runner.catalog.index[entry["item_id"]]
            torch.testing.assert_close(scores[row, index - 1].item(), entry["score"],
                                       rtol=1e-5, atol=1e-5)
        if len(set(expected.values[:6].tolist())) == 6:  # no tie: the order is the argsort's
            assert [e["item_id"] for e in items] == [item_ids[i] for i in expected.indices[:5]]
        assert all(entry["title"].startswith("Item ") for entry in items)  # the items' titles
    # One chunk for the whole catalog gives the same recommendations (scores up to the
    # rounding of a product over another number of items).
    assert_same(loaded(runs, name).recommend(histories, k=5), recommendations)
    # A history alone (no padding, a batch of one) gets what it gets among the others.
    assert_same([runner.recommend([history], k=5)[0] for history in histories],
                recommendations)


def assert_same(recommendations: list[list[dict]], others: list[list[dict]]) -> None:
    assert [[e["item_id"] for e in items] for items in recommendations] == \
        [[e["item_id"] for e in items] for items in others]
    torch.testing.assert_close([[e["score"] for e in items] for items in recommendations],
                               [[e["score"] for e in items] for items in others],
                               rtol=1e-5, atol=1e-5)


def test_a_users_history_is_everything_the_dataset_knows(runs):
    runner = loaded(runs, "id")
    user = first_users(runner, 1)[0]
    sequence = runner.data.sequences[0]["item_indices"]
    assert runner.histories_of([user]) == [[runner.catalog.item_ids[i - 1] for i in sequence]]


@pytest.mark.parametrize("name", ["id", "diffrec"])
def test_exclude_history_never_recommends_a_history_item(runs, name):
    runner = loaded(runs, name, item_chunk_size=9)
    histories = runner.histories_of(first_users(runner))
    everything = len(runner.catalog.item_ids)
    for history, items in zip(histories, runner.recommend(histories, k=everything,
                                                          exclude_history=True), strict=True):
        ids = [entry["item_id"] for entry in items]
        assert not set(ids) & set(history)
        assert len(ids) == everything - len(set(history))  # all the others, each once
    # Without it, the history's items are candidates like any other.
    kept = runner.recommend(histories, k=everything)
    assert all(len(items) == everything for items in kept)


@pytest.mark.parametrize("name", ["text", "adapter"])
def test_a_content_model_recommends_items_it_never_trained_on(runs, name, tmp_path):
    """A new catalog of the old items' texts under new ids, in another order, less some items:
    each new item scores exactly what its text scored in the run's own catalog."""
    runner = loaded(runs, name)
    old = runner.data.items.to_pandas()
    chosen = old.iloc[::-1].iloc[: len(old) - 5]  # reversed, 5 items fewer
    rows = [{"item_id": f"new-{row.item_id}", "title": row.title, "genre": row.genre}
            for row in chosen.itertuples()]
    items = write_items(tmp_path / "items.csv", rows)
    moved = loaded(runs, name, items=items, item_chunk_size=4)
    assert moved.catalog.item_ids == [row["item_id"] for row in rows]
    history = [row["item_id"] for row in rows[:4]]
    recommendations = moved.recommend([history], k=len(rows))[0]
    assert sorted(e["item_id"] for e in recommendations) == sorted(r["item_id"] for r in rows)
    old_scores = full_scores(runner, [[item.removeprefix("new-") for item in history]])[0]
    for entry in recommendations:
        old_index = runner.catalog.index[entry["item_id"].removeprefix("new-")]
        torch.testing.assert_close(entry["score"], old_scores[old_index - 1].item(),
                                   rtol=1e-4, atol=1e-4)
    assert recommendations[0]["title"] == next(
        r["title"] for r in rows if r["item_id"] == recommendations[0]["item_id"])
    # The model's own catalog is untouched, and an old id is unknown to the new one.
    with pytest.raises(ValueError, match="unknown item id"):
        moved.recommend([[old.item_id[0]]], k=3)


def recommend_cli(argv: list[str]) -> None:
    run_main(load_script("recommend").main, argv)


def test_the_script_writes_one_json_line_per_user_or_history(runs, tmp_path):
    run, _ = runs["id"]
    runner = loaded(runs, "id")
    users = first_users(runner, 3)
    output = tmp_path / "out" / "recs.jsonl"
    recommend_cli(["--run", str(run), "--users", *users, "--k", "4", "--exclude-history",
                   "--output", str(output), "--cpu"])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["user"] for line in lines] == users
    assert_same([line["items"] for line in lines],
                runner.recommend(runner.histories_of(users), k=4, exclude_history=True))
    assert set(lines[0]["items"][0]) == {"item_id", "score", "title"}
    assert sorted(p.name for p in output.parent.iterdir()) == ["recs.jsonl"]  # no temp file

    histories = tmp_path / "histories.jsonl"
    histories.write_text(json.dumps({"user": "me", "items": ["i3", "i4"]}) + "\n\n"
                         + json.dumps({"items": ["i5"]}) + "\n")
    recommend_cli(["--run", str(run), "--histories", str(histories), "--k", "2",
                   "--output", str(output), "--cpu"])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["user"] for line in lines] == ["me", None]
    assert_same([line["items"] for line in lines], runner.recommend([["i3", "i4"], ["i5"]], k=2))


@pytest.mark.parametrize("name, argv, message", [
    ("id", ["--run", "{tmp}/nowhere", "--users", "u1"], "is not a run folder"),
    ("id", ["--users", "no-such-user"], "unknown user 'no-such-user'"),
    ("id", ["--users", "u1", "--k", "0"], "--k must be >= 1"),
    ("id", ["--histories", "{tmp}/empty.jsonl"], "line 1: the history is empty"),
    ("id", ["--histories", "{tmp}/unknown.jsonl"], "line 1: unknown item id 'zzz'"),
    ("id", ["--histories", "{tmp}/missing.jsonl"], "no such file"),
    ("id", ["--users", "u1", "--items", "{tmp}/items.csv"], "items are learned IDs"),
    ("text", ["--histories", "{tmp}/unknown.jsonl", "--items", "{tmp}/titles_only.csv"],
     "no column 'genre', which the run's item text template"),
])
def test_bad_input_is_one_line_and_exit_status_2(runs, name, argv, message, tmp_path, capsys):
    run, cache = runs[name]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"user": "a", "items": []}) + "\n")
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"items": ["i1", "zzz"]}) + "\n")
    write_items(tmp_path / "items.csv", [{"item_id": "x", "title": "X", "genre": "g"}])
    write_items(tmp_path / "titles_only.csv", [{"item_id": "x", "title": "X"}])
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if "--run" not in argv:
        argv = ["--run", str(run), *argv]
    if cache is not None:
        argv += ["--encoder-cache-dir", str(cache)]
    output = tmp_path / "recs.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        recommend_cli([*argv, "--output", str(output), "--cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert message in error
    assert not output.exists()


def test_a_run_that_sampled_negatives_by_popularity_loads_for_evaluation_and_serving(
        tiny_dataset_dir, tmp_path):
    from peftrec.downstream import evaluate_any_run
    from peftrec.pretraining.cli import evaluate_parser

    run = tmp_path / "popularity"
    metrics = pretrain(parse_args(pretrain_parser("t"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "1",
        "--loss", "sampled", "--num-negatives", "8", "--negative-sampling", "popularity",
        *MODEL, *TRAIN]))
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]
    assert len(load_run(run, device="cpu").recommend([["i1", "i2"]], k=3)[0]) == 3


def test_the_speed_benchmark_times_batches_and_single_users(runs, capsys):
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import recommend_speed

    run, _ = runs["diffrec"]
    recommend_speed.main(["--runs", str(run), "--repeats", "1", "--latency-users", "6",
                          "--batch-sizes", "4", "16", "--k", "5", "--exclude-history"])
    table = capsys.readouterr().out
    assert "| diffrec | tiny | diffrec |" in table
    assert table.splitlines()[0].endswith(
        "| users/s (batch 4) | users/s (batch 16) | latency ms (median) | latency ms (p90) |")
    row = recommend_speed.measure(run, argparse.Namespace(
        item_chunk_size=7, batch_sizes=[16], max_users=10, k=5, exclude_history=False,
        repeats=1, latency_users=3))
    assert row["users"] == 10 and row["users/s (batch 16)"] > 0
    assert row["latency ms (median)"] > 0


def test_a_new_catalogs_per_item_parameters_start_fresh_from_the_trained_encoder(
        tiny_dataset_dir, text_base, tmp_path):
    """A text DiffRec with an untied output table on a new catalog: the table is the new
    items' content vectors from the trained head, the item bias zero."""
    from tests.helpers import save_bert

    _, cache = text_base
    run = tmp_path / "text_diffrec"
    pretrain(parse_args(pretrain_parser("t", modality="text"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "1",
        "--backbone", "diffrec", "--preset", "none", "--diffusion-steps", "20", "--num-seeds", "2",
        "--untied-output", "--encoder", str(save_bert(tmp_path / "bert", dropout=0.0)),
        "--text-template", "{title} ({genre})", "--encoder-cache-dir", str(cache),
        *MODEL, *TRAIN]))
    items = write_items(tmp_path / "items.csv", [
        {"item_id": f"n{i}", "title": f"Item {i} of group {i // 8}", "genre": f"group{i // 8}"}
        for i in range(12)])
    runner = load_run(run, encoder_cache_dir=cache, items=items, device="cpu")
    model = runner.model
    assert model.config.num_items == 12 and not model.item_bias.any()
    torch.testing.assert_close(model.output_items[1:], model.item_encoder.catalog()[1:])
    top = runner.recommend([["n1", "n2"]], k=12, exclude_history=True)[0]
    expected = sorted(f"n{i}" for i in range(12) if i not in (1, 2))
    assert sorted(e["item_id"] for e in top) == expected
