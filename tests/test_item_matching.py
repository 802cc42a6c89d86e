"""Items matched across domains (`--match-items-by`): matched target items carry their
source rows in every per-item parameter, optionally frozen; the mapping is recorded and an
adapter checkpoint rebuilds it on its base; bad input stops before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from peftrec.adapters import HoulsbyConfig
from peftrec.dataset_tools import PrepareConfig, load_dataset_folder, prepare_dataset
from peftrec.downstream import evaluate_any_run, load_adapted_model, target_config
from peftrec.downstream.cli import finetune_parser, run_finetune
from peftrec.downstream.matching import (
    MATCHING_FILE,
    carry_matched_rows,
    load_source_dataset,
    match_items,
    normalise_value,
)
from peftrec.downstream.transfer import matched_target_model, save_target_model
from peftrec.pretraining.cli import evaluate_parser, parse_args, pretrain_parser
from peftrec.pretraining.evaluation import EvaluationProtocol
from peftrec.pretraining.pipeline import build_accelerator, evaluate_model, pretrain
from peftrec.pretraining.recommender import checkpoint_fingerprint, load_recommender_config
from peftrec.pretraining.trainer import TrainingConfig
from tests.helpers import (
    MODEL,
    TRAIN,
    load_script,
    perturb_adapters,
    write_items,
    write_synthetic_interactions,
)

DIFFREC = ["--backbone", "diffrec", "--preset", "none", "--diffusion-steps", "20",
           "--num-seeds", "2", "--untied-output"]
HOULSBY = ("houlsby", "pfeiffer")
BY = ["--match-items-by", "title,year"]
SCRIPTS = ("finetune_full", "adapter_houlsby", "adapter_lora", "adapter_prefix",
           "adapter_diffusion_step")


def prepare(root: Path, name: str, items: list[dict], **log) -> Path:
    inter = write_synthetic_interactions(root / f"{name}_raw" / "inter.csv", **log)
    items_path = write_items(root / f"{name}_raw" / "items.csv", items)
    return prepare_dataset(inter, "csv", root / name, PrepareConfig(k_core=2),
                           items_path=items_path, user_col="user_id", item_col="item_id",
                           time_col="timestamp")


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> tuple[Path, Path]:
    """(source, target) dataset folders. Source: 40 films "Movie k" (k < 38) of year
    1990 + k % 5, plus two remakes sharing film 0's and film 1's title and year (so those
    keys are ambiguous). Target: 30 items; k < 20 are source films written otherwise (case,
    whitespace, "1992.0"), 20-24 have another year, 25-28 are new, 29 has no title."""
    root = tmp_path_factory.mktemp("domains")
    source = [{"item_id": f"i{k}", "title": f"Movie {k if k < 38 else k - 38}",
               "year": 1990 + (k if k < 38 else k - 38) % 5, "code": f"S{k}"}
              for k in range(40)]
    target = []
    for k in range(30):
        title, year = f"Movie {k}", str(1990 + k % 5)
        if k < 20 and k % 2:
            title = f"  MOVIE   {k} "
        if k < 20 and k % 2 == 0:
            year += ".0"
        if 20 <= k < 25:
            year = "2001"
        if k >= 25:
            title = f"New film {k}" if k < 29 else ""
        target.append({"item_id": f"i{k}", "title": title, "year": year, "code": f"T{k}",
                       "studio": "x"})
    return (prepare(root, "source", source),
            prepare(root, "target", target, num_users=40, num_items=30, seed=7))


def expected_pairs(source_dir: Path, target_dir: Path) -> dict[int, int]:
    """Target index -> source index, from the fixture's construction (not the matcher):
    target item i{k}, k < 20, is source item i{k} or, for k = 0, 1, its remake i{38 + k},
    whichever has the lower index."""
    source = {item: index for index, item in
              enumerate(load_dataset_folder(source_dir).items["item_id"], start=1)}
    pairs = {}
    for index, item in enumerate(load_dataset_folder(target_dir).items["item_id"], start=1):
        k = int(item[1:])
        candidates = [source[i] for i in (f"i{k}", f"i{38 + k}" if k < 2 else None)
                      if i in source]
        if k < 20 and candidates:
            pairs[index] = min(candidates)
    return pairs


@pytest.fixture(scope="module")
def bases(domains, tmp_path_factory) -> dict[str, Path]:
    """Pretraining runs on the source: an ID SASRec, and a DiffRec with an untied output
    table (three per-item parameters: the ID table, the item bias, the output table)."""
    source, _ = domains
    root = tmp_path_factory.mktemp("bases")
    runs = {}
    for name, flags in (("sasrec", ["--preset", "none"]), ("diffrec", DIFFREC)):
        runs[name] = root / name
        pretrain(parse_args(pretrain_parser("t"), [
            "--dataset", str(source), "--output-dir", str(runs[name]), "--epochs", "1",
            *flags, *MODEL, *TRAIN]))
    return runs


def finetune(methods, *argv: str) -> dict:
    return run_finetune(parse_args(finetune_parser("t", methods), [*TRAIN, *argv]))


def per_item(base: Path) -> dict[str, torch.Tensor]:
    weights = load_file(base / "best_model" / "model.safetensors")
    names = ("item_encoder.embedding.weight", "item_bias", "output_items")
    return {name: weights[name] for name in names if name in weights}


def test_values_are_compared_after_normalising_case_whitespace_and_whole_numbers():
    assert normalise_value("  Toy   Story\t(1995) ") == normalise_value("toy story (1995)")
    assert {normalise_value(v) for v in (1995, 1995.0, "1995", " 1995.0 ", "1995.00")} == {
        "1995"}
    assert normalise_value("1995.5") == "1995.5" != normalise_value("1995")
    assert normalise_value("007") != normalise_value("7")  # identifiers keep leading zeros
    assert normalise_value(None) == normalise_value(float("nan")) == ""


def test_matching_counts_and_pairs(domains, bases):
    source_dir, target_dir = domains
    source, target = load_dataset_folder(source_dir), load_dataset_folder(target_dir)
    matching = match_items(source, target, ("title", "year"))
    pairs = expected_pairs(source_dir, target_dir)
    assert dict(zip(matching.target, matching.source, strict=True)) == pairs
    assert (matching.matched, matching.ambiguous, matching.blank) == (len(pairs), 2, 1)
    assert matching.target_items == target.num_items
    # The recorded source dataset is found from the base run alone.
    found = load_source_dataset(bases["sasrec"] / "best_model", source.fingerprint, None, None)
    assert found.fingerprint == source.fingerprint


@pytest.mark.parametrize("backbone", ["sasrec", "diffrec"])
def test_matched_items_carry_the_source_rows_bit_for_bit_in_every_per_item_parameter(
        domains, bases, backbone):
    source_dir, target_dir = domains
    base_dir = bases[backbone] / "best_model"
    target = load_dataset_folder(target_dir)
    matching = match_items(load_dataset_folder(source_dir), target, ("title", "year"))
    config = target_config(load_recommender_config(base_dir), target)
    torch.manual_seed(0)
    model = matched_target_model(config, base_dir, target, matching=matching)
    torch.manual_seed(0)
    unmatched_build = matched_target_model(config, base_dir, target)
    source_rows = per_item(bases[backbone])
    assert set(source_rows) == set(model.catalog_parameter_names()) == (
        {"item_encoder.embedding.weight"} if backbone == "sasrec"
        else {"item_encoder.embedding.weight", "item_bias", "output_items"})
    pairs = expected_pairs(source_dir, target_dir)
    parameters = dict(model.named_parameters())
    fresh = dict(unmatched_build.named_parameters())
    others = [i for i in range(1, target.num_items + 1) if i not in pairs]
    for name, rows in source_rows.items():
        carried = parameters[name].detach()
        for t, s in pairs.items():
            assert torch.equal(carried[t], rows[s]), (name, t, s)
        # The others are exactly what a build without matching gives, and no source row.
        assert torch.equal(carried[others], fresh[name].detach()[others])
        for i in others:
            assert not (rows[1:] == carried[i]).reshape(len(rows) - 1, -1).all(1).any()
    # Zero-shot: the unmatched items are the average source item.
    model = matched_target_model(config, base_dir, target)
    carry_matched_rows(model, base_dir, matching, unmatched="source_mean")
    for name, rows in source_rows.items():
        carried = dict(model.named_parameters())[name].detach()
        assert torch.equal(carried[others], rows[1:].mean(0).expand_as(carried[others]))


def matched_rows(source_dir, target_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's matched item indices, their source indices (in the same order), and
    the target's other (fresh) item indices."""
    pairs = expected_pairs(source_dir, target_dir)
    matched = torch.tensor(sorted(pairs))
    source_index = torch.tensor([pairs[t] for t in sorted(pairs)])
    others = torch.tensor([i for i in range(1, len(load_dataset_folder(target_dir).items) + 1)
                           if i not in pairs])
    return matched, source_index, others


@pytest.mark.parametrize("backbone", ["sasrec", "diffrec"])
def test_frozen_matched_rows_stay_bit_identical_under_weight_decay(domains, bases, tmp_path,
                                                                   backbone):
    source_dir, target_dir = domains
    matched, source_index, others = matched_rows(source_dir, target_dir)
    source_rows = per_item(bases[backbone])
    common = ["--pretrained", str(bases[backbone]), "--dataset", str(target_dir), *BY,
              "--epochs", "2", "--lr", "0.01", "--weight-decay", "0.5", "--seed", "3"]
    frozen = finetune((), *common, "--output-dir", str(tmp_path / "frozen"),
                      "--freeze-matched-items")
    trained = finetune((), *common, "--output-dir", str(tmp_path / "trained"))
    frozen_rows = load_file(tmp_path / "frozen" / "best_model" / "model.safetensors")
    trained_rows = load_file(tmp_path / "trained" / "best_model" / "model.safetensors")
    # The unmatched rows as the run built them (seeded like train_run does).
    target = load_dataset_folder(target_dir)
    base_dir = bases[backbone] / "best_model"
    matching = match_items(load_dataset_folder(source_dir), target, ("title", "year"))
    set_seed(3)
    start = dict(matched_target_model(target_config(load_recommender_config(base_dir), target),
                                      base_dir, target, matching=matching).named_parameters())
    for name, rows in source_rows.items():
        assert torch.equal(frozen_rows[name][matched], rows[source_index]), name
        assert not torch.equal(trained_rows[name][matched], rows[source_index]), name
        assert not torch.equal(frozen_rows[name][others], start[name].detach()[others]), name
    assert frozen["parameters"]["trainable_percent"] < 100
    assert trained["parameters"]["trainable_percent"] == 100
    assert frozen["parameters"]["total"] == trained["parameters"]["total"]
    matched_share = sum(len(matched) * rows[0].numel() for rows in source_rows.values())
    assert frozen["parameters"]["trainable"] == trained["parameters"]["trainable"] - matched_share
    # The complete checkpoint is a plain one: evaluate.py reloads it to the same metrics.
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(tmp_path / "frozen"), "--cpu", "--output", str(tmp_path / "e.json")]))
    assert again["test"] == frozen["test"]


def test_an_adapter_with_frozen_matched_rows_stores_only_the_others_and_reloads_exactly(
        domains, bases, tmp_path):
    source_dir, target_dir = domains
    target = load_dataset_folder(target_dir)
    pairs = expected_pairs(source_dir, target_dir)
    run = tmp_path / "houlsby"
    metrics = finetune(HOULSBY, "--pretrained", str(bases["sasrec"]), "--dataset",
                       str(target_dir), "--output-dir", str(run), *BY, "--freeze-matched-items",
                       "--epochs", "2", "--weight-decay", "0.5", "--layers", "top:1",
                       "--sites", "ffn", "--reduction-factor", "4")
    best = run / "best_model"
    saved = load_file(best / "adapter_model.safetensors")
    table = "item_encoder.embedding.parametrizations.weight.original"
    assert "item_encoder.embedding.weight" not in saved
    assert saved[table].shape == (target.num_items + 1 - len(pairs), 16)  # padding + others
    assert sorted(p.name for p in best.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "checksums.json", MATCHING_FILE]
    record = json.loads((best / "adapter_config.json").read_text())["item_matching"]
    assert (record["frozen"], record["matched"]) == (True, len(pairs))
    model = load_adapted_model(best, target)
    weights = dict(model.named_parameters())
    source_rows = per_item(bases["sasrec"])["item_encoder.embedding.weight"]
    table_now = model.item_encoder.embedding.weight.detach()
    assert all(torch.equal(table_now[t], source_rows[s]) for t, s in pairs.items())
    assert not weights["item_encoder.embedding.parametrizations.weight.0.frozen"].requires_grad
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]

    # Before save and after reload: the same metrics, with adapters and rows moved.
    base_dir = bases["sasrec"] / "best_model"
    adapter = HoulsbyConfig(layers="top:1", sites=("ffn",))
    matching = match_items(load_dataset_folder(source_dir), target, ("title", "year"))
    config = target_config(load_recommender_config(base_dir), target, adapter)
    model = matched_target_model(config, base_dir, target, adapter=adapter, matching=matching,
                                 frozen=True)
    perturb_adapters(model, 0.5)  # stands in for training
    with torch.no_grad():
        dict(model.named_parameters())[table].add_(0.3)
    accelerator = build_accelerator(TrainingConfig(output_dir=str(tmp_path), cpu=True,
                                                   report_to="none"))
    before = evaluate_model(model, target, EvaluationProtocol(), 16, accelerator)
    save_target_model(model, tmp_path / "adapter", adapter, base_dir,
                      checkpoint_fingerprint(base_dir), matching, frozen=True)
    after = evaluate_model(load_adapted_model(tmp_path / "adapter", target), target,
                           EvaluationProtocol(), 16, accelerator)
    assert after["test"] == before["test"] and after["valid"] == before["valid"]


def test_an_adapter_with_trainable_matched_rows_stores_the_whole_table(domains, bases,
                                                                       tmp_path):
    _, target_dir = domains
    run = tmp_path / "lora"
    metrics = finetune(("lora",), "--pretrained", str(bases["sasrec"]), "--dataset",
                       str(target_dir), "--output-dir", str(run), *BY, "--epochs", "1",
                       "--rank", "2")
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    target = load_dataset_folder(target_dir)
    assert saved["item_encoder.embedding.weight"].shape == (target.num_items + 1, 16)
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_lora_on_the_item_table_moves_matched_rows_and_stores_only_factors_and_fresh_rows(
        domains, bases, tmp_path):
    """--adapt both: LoRA on the backbone and on the ID table. The matched rows stay as
    pretrained under the low-rank update (not stored), the fresh rows train (stored); the
    checkpoint reloads onto its base to the same metrics."""
    source_dir, target_dir = domains
    matched, source_index, others = matched_rows(source_dir, target_dir)
    run = tmp_path / "lora-table"
    metrics = finetune(("lora",), "--pretrained", str(bases["sasrec"]), "--dataset",
                       str(target_dir), "--output-dir", str(run), *BY, "--adapt", "both",
                       "--rank", "2", "--epochs", "2", "--lr", "0.01", "--weight-decay", "0.5")
    best = run / "best_model"
    saved = load_file(best / "adapter_model.safetensors")
    table = "item_encoder.embedding"
    assert {name for name in saved if name.startswith(table)} == {
        f"{table}.lora_embedding_A.default", f"{table}.lora_embedding_B.default",
        f"{table}.base_layer.parametrizations.weight.original"}
    num_rows = load_dataset_folder(target_dir).num_items + 1
    assert saved[f"{table}.lora_embedding_A.default"].shape == (2, num_rows)
    assert saved[f"{table}.base_layer.parametrizations.weight.original"].shape == (
        num_rows - len(matched), 16)  # padding + the fresh rows
    assert all(".lora_" in name for name in saved if not name.startswith(table))

    model = load_adapted_model(best, load_dataset_folder(target_dir))
    source_rows = per_item(bases["sasrec"])[f"{table}.weight"]
    base_rows = model.item_encoder.embedding.base_layer.weight.detach()
    assert torch.equal(base_rows[matched], source_rows[source_index])
    rows = model.item_encoder.catalog().detach()
    assert not torch.equal(rows[matched], source_rows[source_index])  # moved by the update
    assert not torch.equal(rows[others], base_rows[others])
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_counts_are_printed_and_recorded_and_an_id_model_runs_zero_shot(domains, bases,
                                                                        tmp_path, capsys):
    source_dir, target_dir = domains
    pairs = expected_pairs(source_dir, target_dir)
    target = load_dataset_folder(target_dir)
    run = tmp_path / "zero"
    metrics = finetune((), "--pretrained", str(bases["sasrec"]), "--dataset", str(target_dir),
                       "--output-dir", str(run), *BY, "--zero-shot")
    assert 0 <= metrics["test"]["ndcg@10"] <= 1
    line = f"matched {len(pairs)} of {target.num_items} target items by title,year (2 ambiguous)"
    assert line in capsys.readouterr().out
    record = json.loads((run / "config.json").read_text())["transfer"]["item_matching"]
    source = load_dataset_folder(source_dir)
    assert record["fields"] == ["title", "year"]
    assert (record["matched"], record["ambiguous"], record["blank"]) == (len(pairs), 2, 1)
    assert (record["target_items"], record["source_items"]) == (target.num_items,
                                                                source.num_items)
    assert record["source_dataset"]["fingerprint"] == source.fingerprint
    assert (record["unmatched"], record["file"]) == ("source_mean", MATCHING_FILE)
    saved = json.loads((run / MATCHING_FILE).read_text())
    assert {t: s for t, s in saved["target_to_source"]} == pairs
    assert saved["fingerprint"] == record["fingerprint"]


def test_a_moved_source_dataset_is_named_and_found_with_source_dataset(domains, bases,
                                                                       tmp_path):
    source_dir, target_dir = domains
    base = tmp_path / "base"
    shutil.copytree(bases["sasrec"], base)
    config = json.loads((base / "config.json").read_text())
    config["dataset"]["path"] = str(tmp_path / "gone")
    (base / "config.json").write_text(json.dumps(config))
    argv = ["--pretrained", str(base), "--dataset", str(target_dir), *BY, "--zero-shot"]
    with pytest.raises(ValueError, match=r"no longer at .*gone.*pass --source-dataset DIR"):
        finetune((), *argv, "--output-dir", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"--source-dataset .* is not the dataset"):
        finetune((), *argv, "--output-dir", str(tmp_path / "b"), "--source-dataset",
                 str(target_dir))
    assert not (tmp_path / "b").exists()
    finetune((), *argv, "--output-dir", str(tmp_path / "c"), "--source-dataset",
             str(source_dir))
    assert (tmp_path / "c" / MATCHING_FILE).is_file()


@pytest.fixture(scope="module")
def text_base(domains, tmp_path_factory) -> tuple[Path, Path]:
    """A text SASRec (tiny BERT, frozen + cached): no per-item parameter at all."""
    from tests.helpers import save_bert

    source, _ = domains
    root = tmp_path_factory.mktemp("text_base")
    run = root / "run"
    pretrain(parse_args(pretrain_parser("t", modality="text"), [
        "--dataset", str(source), "--output-dir", str(run), "--epochs", "1", "--max-steps",
        "1", "--encoder", str(save_bert(root / "bert")), "--text-template", "{title} ({year})",
        "--encoder-cache-dir", str(root / "cache"), "--preset", "none", *MODEL, *TRAIN]))
    return run, root / "cache"


@pytest.mark.parametrize("extra, message", [
    (["--match-items-by", "title,studio"],
     r"--match-items-by title,studio: the source dataset .*source has no item field 'studio' "
     r"\(its items have \['item_id', 'title', 'year', 'code'\]\)"),
    (["--match-items-by", "nope"], r"the target dataset .*target has no item field 'nope'"),
    (["--match-items-by", "code"], r"--match-items-by code: 0 of \d+ target items match"),
    (["--match-items-by", "title", "--from-scratch"], "--from-scratch uses no pretrained"),
    (["--freeze-matched-items"], "--freeze-matched-items: needs item fields to match by"),
    (["--match-items-by", ","], "--match-items-by: needs item fields"),
], ids=["source-lacks-field", "both-lack-field", "zero-matched", "scratch", "freeze-alone",
        "no-field"])
def test_bad_input_stops_in_one_line_before_anything_is_written(domains, bases, tmp_path,
                                                                 extra, message):
    _, target_dir = domains
    run = tmp_path / "bad"
    with pytest.raises(ValueError, match=message) as error:
        finetune((), "--pretrained", str(bases["sasrec"]), "--dataset", str(target_dir),
                 "--output-dir", str(run), *extra)
    assert "\n" not in str(error.value)
    assert not run.exists()


@pytest.mark.parametrize("methods, extra", [((), ["--zero-shot"]), (HOULSBY, [])])
def test_matching_on_a_pure_content_model_has_nothing_to_carry(domains, text_base, tmp_path,
                                                               methods, extra):
    _, target_dir = domains
    run_dir, cache = text_base
    run = tmp_path / "content"
    with pytest.raises(ValueError, match="no per-item parameters .* matching has nothing to "
                                         "carry; drop --match-items-by") as error:
        finetune(methods, "--pretrained", str(run_dir), "--dataset", str(target_dir),
                 "--output-dir", str(run), "--encoder-cache-dir", str(cache), *BY, *extra)
    assert "\n" not in str(error.value)
    assert not run.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_finetuning_script_takes_the_matching_flags(script, capsys):
    with pytest.raises(SystemExit) as done:
        load_script(script).main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--match-items-by", "--freeze-matched-items", "--source-dataset"):
        assert flag in help_text, (script, flag)


@pytest.mark.slow
def test_ml1m_to_ml100k_matches_1278_items_by_title_and_year():
    from peftrec.dataset_tools import resolve_dataset

    ml1m, ml100k = (load_dataset_folder(resolve_dataset(n)) for n in ("ml-1m", "ml-100k"))
    matching = match_items(ml1m, ml100k, ("movie_title", "release_year"))
    assert (matching.matched, matching.target_items, matching.ambiguous) == (1278, 1341, 0)


def test_freeze_embeddings_keeps_the_matched_rows_and_positions_and_trains_the_others(
        domains, bases, tmp_path):
    """--freeze embeddings on matched items: the pretrained rows (and the positions) stay
    as pretrained, as with --freeze-matched-items; the fresh rows train."""
    source_dir, target_dir = domains
    matched, source_index, others = matched_rows(source_dir, target_dir)
    base = load_file(bases["sasrec"] / "best_model" / "model.safetensors")
    common = ["--pretrained", str(bases["sasrec"]), "--dataset", str(target_dir), *BY,
              "--epochs", "1", "--lr", "0.01", "--seed", "3"]
    finetune((), *common, "--output-dir", str(tmp_path / "frozen"), "--freeze", "embeddings")
    finetune((), *common, "--output-dir", str(tmp_path / "trained"))
    frozen = load_file(tmp_path / "frozen" / "best_model" / "model.safetensors")
    trained = load_file(tmp_path / "trained" / "best_model" / "model.safetensors")
    table, positions = "item_encoder.embedding.weight", "backbone.position_embedding.weight"
    assert torch.equal(frozen[table][matched], base[table][source_index])
    assert torch.equal(frozen[positions], base[positions])
    assert not torch.equal(trained[positions], base[positions])
    config = json.loads((tmp_path / "frozen" / "config.json").read_text())
    assert config["transfer"]["item_matching"]["frozen"] is True
    # The fresh rows trained: the same start (seed 3) in both runs, moved in both.
    assert not torch.equal(frozen[table][others], trained[table][others])
