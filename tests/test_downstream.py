"""Transfer to a target dataset: rebuilt item side, adapters, adapter-only checkpoints,
full fine-tuning, from scratch, zero-shot, and bad input before any training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftrec.adapters import HoulsbyConfig, LoRAConfig, PfeifferConfig, PrefixConfig, PromptConfig
from peftrec.adapters.checkpoint import AdapterCheckpointError
from peftrec.dataset_tools import load_dataset_folder
from peftrec.dataset_tools.integrity import write_checksums
from peftrec.downstream import evaluate_any_run, load_adapted_model
from peftrec.pretraining.cli import evaluate_parser, parse_args, pretrain_parser
from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded
from peftrec.pretraining.pipeline import pretrain
from peftrec.pretraining.recommender import CheckpointError
from tests.helpers import MODEL, TRAIN, finetune

ROOT = Path(__file__).resolve().parents[1]
HOULSBY = ("houlsby", "pfeiffer")


@pytest.fixture(scope="module")
def id_base(tiny_dataset_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bases") / "id"
    # --preset none: a base without the repeat bias, which a test adds in fine-tuning.
    pretrain(parse_args(pretrain_parser("t"), ["--dataset", str(tiny_dataset_dir),
                                               "--output-dir", str(run), "--epochs", "2",
                                               "--preset", "none", *MODEL, *TRAIN]))
    return run


def scores_on(model, data) -> torch.Tensor:
    batch = collate_left_padded([LeaveOneOutDataset(data, "test", 20)[i] for i in range(8)])
    with torch.no_grad():
        return model.eval().scores(batch)


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
            for name, t in tensors.items()}


def test_houlsby_transfer_saves_the_adapter_alone_and_reloads_it_exactly(
        id_base, target_dir, tmp_path):
    run = tmp_path / "houlsby"
    metrics = finetune(HOULSBY, "--pretrained", str(id_base), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "2", "--layers", "top:1",
                       "--sites", "ffn", "--reduction-factor", "4")
    best = run / "best_model"
    assert sorted(p.name for p in best.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors",
                                                      "checksums.json"]
    saved = load_file(best / "adapter_model.safetensors")
    target = load_dataset_folder(target_dir)
    # The bottleneck of layer 1's feed-forward and the target's fresh item table, nothing else.
    assert set(saved) == {
        "item_encoder.embedding.weight",
        *(f"backbone.layers.1.feed_forward.adapter.{p}.{w}"
          for p in ("down", "up") for w in ("weight", "bias")),
    }
    assert saved["item_encoder.embedding.weight"].shape == (target.num_items + 1, 16)
    bottleneck = (16 * 4 + 4) + (4 * 16 + 16)
    table = (target.num_items + 1) * 16
    assert metrics["parameters"]["trainable"] == bottleneck + table
    assert metrics["checkpoint_mb"] > 0

    # The frozen base weights are exactly the pretrained ones, and reloading the adapter
    # onto the base reproduces the run's scores and metrics.
    model = load_adapted_model(best, target)
    base = load_file(id_base / "best_model" / "model.safetensors")
    reloaded = {name.replace(".base.", "."): t for name, t in model.state_dict().items()
                if name.startswith("backbone.") and ".adapter." not in name}
    assert digest(reloaded) == digest({n: t for n, t in base.items() if n.startswith("backbone.")})
    assert torch.equal(scores_on(model, target), scores_on(load_adapted_model(best, target),
                                                           target))
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]

    # Loading onto another base is refused.
    other = tmp_path / "other_base"
    shutil.copytree(id_base / "best_model", other)
    weights = load_file(other / "model.safetensors")
    weights["backbone.final_norm.bias"] += 1.0
    from safetensors.torch import save_file
    save_file(weights, str(other / "model.safetensors"))
    write_checksums(other)  # a consistent checkpoint of another base
    with pytest.raises(AdapterCheckpointError, match="another base model"):
        load_adapted_model(best, target, base_dir=other)


def test_a_repeat_bias_added_to_a_base_without_one_is_trained_saved_and_reloaded(
        id_base, target_dir, tmp_path):
    run = tmp_path / "houlsby_repeat"
    metrics = finetune(HOULSBY, "--pretrained", str(id_base), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "2", "--layers", "top:1",
                       "--sites", "ffn", "--reduction-factor", "4", "--repeat-bias")
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    assert saved["repeat_bias"].item() < 0  # the synthetic users never repeat an item
    bottleneck = (16 * 4 + 4) + (4 * 16 + 16)
    table = saved["item_encoder.embedding.weight"].numel()
    assert metrics["parameters"]["trainable"] == bottleneck + table + 1
    target = load_dataset_folder(target_dir)
    model = load_adapted_model(run / "best_model", target)
    assert model.config.repeat_bias and model.repeat_bias.item() == saved["repeat_bias"].item()
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_lora_transfer_round_trips_and_trains_only_lora_and_the_table(id_base, target_dir,
                                                                       tmp_path):
    run = tmp_path / "lora"
    metrics = finetune(("lora",), "--pretrained", str(id_base / "best_model"), "--dataset",
                       str(target_dir), "--output-dir", str(run), "--epochs", "1",
                       "--rank", "2", "--target-modules", "q_proj,v_proj")
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    lora = {n for n in saved if "lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert set(saved) - lora == {"item_encoder.embedding.weight"}
    model = load_adapted_model(run / "best_model", load_dataset_folder(target_dir))
    assert metrics["parameters"]["trainable"] == sum(
        p.numel() for n, p in model.named_parameters() if n in saved)


def test_an_interrupted_adapter_run_resumes(id_base, target_dir, tmp_path):
    """Adapter settings hold tuples (sites, extras), which config.json keeps as lists."""
    run = tmp_path / "houlsby"
    argv = ["--pretrained", str(id_base / "best_model"), "--dataset", str(target_dir),
            "--output-dir", str(run), "--sites", "attn,ffn", "--tune", "layernorm"]
    finetune(HOULSBY, *argv, "--epochs", "1")
    finetune(HOULSBY, *argv, "--epochs", "2", "--resume")
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match=r"transfer settings differ \(\['adapter'\]\)"):
        finetune(HOULSBY, *argv[:-2], "--tune", "bias", "--epochs", "3", "--resume")


def test_full_finetuning_and_from_scratch_write_complete_checkpoints(id_base, target_dir,
                                                                     tmp_path):
    base = load_file(id_base / "best_model" / "model.safetensors")
    for flag, name in ((), "full"), (("--from-scratch",), "scratch"):
        run = tmp_path / name
        metrics = finetune((), "--pretrained", str(id_base), "--dataset", str(target_dir),
                           "--output-dir", str(run), "--epochs", "1", "--max-steps", "0", *flag)
        assert metrics["parameters"]["trainable_percent"] == 100.0
        config = json.loads((run / "config.json").read_text())
        assert config["transfer"]["method"] == name
        assert (run / "best_model" / "model.safetensors").is_file()
    # Everything moved in full fine-tuning; the scratch model never saw the base weights.
    full = load_file(tmp_path / "full" / "best_model" / "model.safetensors")
    scratch = load_file(tmp_path / "scratch" / "best_model" / "model.safetensors")
    name = "backbone.layers.0.attention.q_proj.weight"
    assert not torch.equal(full[name], base[name])
    assert (full[name] - base[name]).abs().max() < (scratch[name] - base[name]).abs().max()


def test_zero_shot_needs_a_content_model(id_base, target_dir, tmp_path):
    with pytest.raises(ValueError, match="zero-shot transfer needs a content item encoder"):
        finetune((), "--pretrained", str(id_base), "--dataset", str(target_dir),
                 "--output-dir", str(tmp_path / "z"), "--zero-shot")


@pytest.mark.parametrize("methods, extra, message", [
    (HOULSBY, ["--layers", "7"], "layer 7 is out of range: the model has 2 layers"),
    (HOULSBY, ["--sites", "attn,mlp"], "unknown adapter site(s) 'mlp'"),
    (HOULSBY, ["--adapt", "item_encoder"], "the base model's items are IDs"),
    (HOULSBY, ["--backbone", "diffrec"], "is a sasrec model"),
    (HOULSBY, ["--tune", "everything"], "unknown trainable extra(s) 'everything'"),
    (("lora",), ["--target-modules", "nope"], "nope"),
])
def test_bad_placement_fails_before_training(id_base, target_dir, tmp_path, methods, extra,
                                             message):
    run = tmp_path / "bad"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune(methods, "--pretrained", str(id_base), "--dataset", str(target_dir),
                 "--output-dir", str(run), *extra)
    assert not (run / "config.json").exists()  # nothing written: a rerun is not blocked


def test_pretrained_that_is_not_a_checkpoint_is_refused(target_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no pretrained checkpoint there"):
        finetune(HOULSBY, "--pretrained", str(tmp_path), "--dataset", str(target_dir))


def test_adapter_script_reports_an_unknown_method_in_one_line(id_base, target_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "adapter_houlsby.py"), "--pretrained",
         str(id_base), "--dataset", str(target_dir), "--method", "lora", *TRAIN],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "invalid choice: 'lora'" in result.stderr and "Traceback" not in result.stderr


def test_text_transfer_adapts_the_item_encoder_top_layer_and_the_backbone(text_base, target_dir,
                                                                         tmp_path):
    run_dir, cache = text_base
    run = tmp_path / "both"
    metrics = finetune(HOULSBY, "--pretrained", str(run_dir), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "1", "--adapt", "both",
                       "--layers", "top:1", "--encoder-cache-dir", str(cache))
    config = json.loads((run / "config.json").read_text())["model"]["item_encoder_config"]
    assert (config["freeze"], config["trainable_layers"]) == (False, 1)  # partial caching
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    prefix = "item_encoder.encoder.model.encoder.layer.1."
    assert {n.split(".adapter.")[0] for n in saved} == {
        prefix + "attention.output.dense", prefix + "output.dense",
        "backbone.layers.1.attention", "backbone.layers.1.feed_forward"}
    # No per-item parameters: the content model's trainable share is the adapters alone.
    assert metrics["parameters"]["trainable"] == sum(t.numel() for t in saved.values())
    assert metrics["parameters"]["trainable_percent"] < 10
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_zero_shot_and_lora_through_peft_on_the_text_encoder(text_base, target_dir, tmp_path):
    run_dir, cache = text_base
    zero = finetune((), "--pretrained", str(run_dir), "--dataset", str(target_dir),
                    "--output-dir", str(tmp_path / "zero"), "--zero-shot",
                    "--encoder-cache-dir", str(cache))
    assert 0 <= zero["test"]["ndcg@10"] <= 1
    assert json.loads((tmp_path / "zero" / "config.json").read_text())["transfer"]["method"] \
        == "zero_shot"
    run = tmp_path / "lora"
    metrics = finetune(("lora",), "--pretrained", str(run_dir), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "1", "--adapt", "item_encoder",
                       "--layers", "top:1", "--rank", "2", "--encoder-cache-dir", str(cache))
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    assert saved and all(".layer.1." in n and "lora_" in n for n in saved)
    # The same LoRA as a peft adapter folder (test_lora_peft loads one with plain peft).
    exported = load_file(run / "best_model" / "peft" / "item_encoder.encoder.model"
                         / "adapter_model.safetensors")
    assert sorted(exported) == sorted(
        "base_model.model." + n.removeprefix("item_encoder.encoder.model.").replace(
            ".default.", ".") for n in saved)
    again = load_adapted_model(run / "best_model", load_dataset_folder(target_dir),
                               encoder_cache_dir=cache)
    assert metrics["parameters"]["trainable"] == sum(
        p.numel() for p in again.parameters() if p.requires_grad)


def test_evaluate_reads_and_fills_the_encoder_cache_it_is_given(text_base, tmp_path):
    run_dir, _ = text_base
    cache = tmp_path / "elsewhere"
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run_dir), "--cpu", "--output", str(tmp_path / "eval.json"),
        "--encoder-cache-dir", str(cache)]))
    # The frozen encoder's outputs were cached where the flag says, and score as before.
    assert any(cache.rglob("*.safetensors"))
    assert again["test"] == json.loads((run_dir / "metrics.json").read_text())["test"]


def test_zero_shot_refuses_an_existing_run_folder_unless_resumed(text_base, target_dir,
                                                                 tmp_path):
    run_dir, cache = text_base
    run = tmp_path / "zero"
    argv = ["--pretrained", str(run_dir), "--dataset", str(target_dir), "--output-dir",
            str(run), "--zero-shot", "--encoder-cache-dir", str(cache)]
    first = finetune((), *argv)
    written = {name: (run / name).read_bytes() for name in ("config.json", "metrics.json")}
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        finetune((), *argv, "--eval-users", "5")
    assert {name: (run / name).read_bytes() for name in written} == written
    assert finetune((), *argv, "--resume")["test"] == first["test"]


def test_reparameterised_prefix_is_saved_folded_and_reloads_to_the_same_metrics(
        id_base, target_dir, tmp_path):
    run = tmp_path / "prefix"
    metrics = finetune(("prefix", "prompt"), "--pretrained", str(id_base), "--dataset",
                       str(target_dir), "--output-dir", str(run), "--epochs", "2",
                       "--num-virtual-tokens", "3", "--reparameterize")
    best = run / "best_model"
    adapter = json.loads((best / "adapter_config.json").read_text())["adapter"]
    assert adapter["reparameterize"] is False
    saved = load_file(best / "adapter_model.safetensors")
    assert not any("mlp" in n or n.endswith(".embedding") for n in saved)
    assert saved["backbone.layers.0.attention.key_value"].shape == (3, 32)
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_a_setting_of_another_method_is_refused(id_base, target_dir, tmp_path):
    with pytest.raises(ValueError, match="--num-tokens: not a setting of --method prefix"):
        finetune(("prefix", "prompt"), "--pretrained", str(id_base), "--dataset",
                 str(target_dir), "--output-dir", str(tmp_path / "x"), "--num-tokens", "3")


def test_diffusion_step_adapters_transfer_a_diffrec(tiny_dataset_dir, id_base, target_dir,
                                                    tmp_path):
    base = tmp_path / "diffrec"
    pretrain(parse_args(pretrain_parser("t"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(base), "--epochs", "1",
        "--backbone", "diffrec", "--preset", "none", "--diffusion-steps", "20", "--num-seeds", "2",
        *MODEL, *TRAIN]))
    run = tmp_path / "step"
    metrics = finetune(("diffusion_step",), "--pretrained", str(base), "--dataset",
                       str(target_dir), "--output-dir", str(run), "--epochs", "1",
                       "--backbone", "diffrec", "--layers", "top:1", "--sites", "ffn")
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    # The fresh per-item parameters of the target (table, generative bias) and the adapter.
    assert {"item_encoder.embedding.weight", "item_bias"} <= set(saved)
    assert all(n in ("item_encoder.embedding.weight", "item_bias") or ".layers.1." in n
               for n in saved)
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]
    with pytest.raises(ValueError, match="need a diffusion backbone"):
        finetune(("diffusion_step",), "--pretrained", str(id_base), "--dataset",
                 str(target_dir), "--output-dir", str(tmp_path / "bad"))


def test_target_text_template_falls_back_to_the_targets_default():
    from types import SimpleNamespace

    from peftrec.downstream.transfer import target_template

    def data(name, columns):
        return SimpleNamespace(name=name, path=f"/data/{name}",
                               items=SimpleNamespace(column_names=columns))

    ml1m = "{movie_title} ({release_year}). Genres: {genre}"
    ml100k_columns = ["item_id", "movie_title", "release_year", "class"]
    assert target_template(ml1m, data("ml-100k", ml100k_columns)) == \
        "{movie_title} ({release_year}). Genres: {class}"
    assert target_template("{movie_title}", data("ml-100k", ml100k_columns)) == "{movie_title}"
    with pytest.raises(ValueError, match=r"uses fields \['genre'\].*pass --text-template"):
        target_template(ml1m, data("mine", ml100k_columns))


def test_transfer_demo_prints_the_three_runs_and_reuses_them(tiny_dataset_dir, target_dir,
                                                             tmp_path, capsys):
    from peftrec.downstream.demo import transfer_demo
    from tests.helpers import save_bert

    encoder = save_bert(tmp_path / "bert")
    kwargs = dict(source=str(tiny_dataset_dir), target=str(target_dir),
                  output_dir=tmp_path / "demo", encoder=str(encoder), pretrain_epochs=1,
                  finetune_epochs=1, pretrain_flags=tuple(MODEL),
                  common=(*TRAIN, "--text-template", "{title} ({genre})",
                          "--encoder-cache-dir", str(tmp_path / "cache")))
    table = transfer_demo(**kwargs)
    lines = table.splitlines()[2:]
    assert [line.split(" (")[0] for line in lines] == [
        f"{target_dir} houlsby adapters", f"{target_dir} full fine-tuning",
        f"{target_dir} from scratch"]
    assert "100.0% trained" in lines[1] and "100.0% trained" not in lines[0]
    assert transfer_demo(**kwargs) == table  # finished runs are reused, not retrained
    # In --output-dir, named by the datasets (a dataset folder's path put them beside it).
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "target-from-scratch", "target-full-fine-tuning", "target-houlsby-adapters", "tiny-text"]


@pytest.mark.parametrize("adapter", [
    HoulsbyConfig(layers="top:1"), PfeifferConfig(parallel=True), LoRAConfig(rank=2),
    PrefixConfig(num_virtual_tokens=3), PromptConfig(num_tokens=2, layers="bottom:1"),
], ids=lambda config: config.method)
def test_adapter_only_checkpoint_reproduces_the_trained_models_scores(id_base, target_dir,
                                                                      tmp_path, adapter):
    from dataclasses import asdict

    from peftrec.adapters.checkpoint import save_adapter
    from peftrec.downstream import adapt, build_target_model, target_config
    from peftrec.pretraining.recommender import checkpoint_fingerprint, load_recommender_config
    from tests.helpers import perturb_adapters

    base_dir = id_base / "best_model"
    target = load_dataset_folder(target_dir)
    config = target_config(load_recommender_config(base_dir), target, adapter)
    model = adapt(build_target_model(config, base_dir, target), adapter)
    perturb_adapters(model, 0.5)  # stands in for training
    save_adapter(model, tmp_path / "adapter", adapter, checkpoint_fingerprint(base_dir),
                 metadata={"pretrained": str(base_dir), "model": asdict(config)})
    reloaded = load_adapted_model(tmp_path / "adapter", target)
    assert torch.equal(scores_on(reloaded, target), scores_on(model, target))


def test_base_checkpoint_of_another_architecture_is_refused(id_base, target_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(id_base / "best_model", other)
    meta = json.loads((other / "config.json").read_text())
    meta["config"]["backbone_config"]["num_layers"] = 3
    (other / "config.json").write_text(json.dumps(meta))
    write_checksums(other)  # a consistent checkpoint of another architecture
    with pytest.raises(CheckpointError, match="does not fit the target model"):
        finetune(HOULSBY, "--pretrained", str(other), "--dataset", str(target_dir),
                 "--output-dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("methods, placement, wrapped", [
    (HOULSBY, ["--sites", "projection", "--reduction-factor", "4"], "BottleneckSite"),
    (("lora",), ["--target-modules", "projection", "--rank", "2"], "Linear"),  # peft's
])
def test_adapters_on_the_cached_encoders_output_head_keep_the_cache(
        text_base, target_dir, tmp_path, methods, placement, wrapped):
    run_dir, cache = text_base
    run = tmp_path / "head"
    common = ["--pretrained", str(run_dir), "--dataset", str(target_dir),
              "--encoder-cache-dir", str(cache)]
    zero = finetune((), *common, "--output-dir", str(tmp_path / "zero"), "--zero-shot")
    # lr 0: the injected adapter alone must leave the zero-shot scores exactly as they were.
    untrained = finetune(methods, *common, "--output-dir", str(run), "--epochs", "1",
                         "--lr", "0", "--adapt", "item_encoder", *placement)
    assert untrained["test"] == zero["test"]
    config = json.loads((run / "config.json").read_text())["model"]["item_encoder_config"]
    assert config["freeze"] is True  # still frozen + cached: no transformer layer in the step
    model = load_adapted_model(run / "best_model", load_dataset_folder(target_dir),
                               encoder_cache_dir=cache)
    assert model.item_encoder.encoder is None
    assert type(model.item_encoder.projection).__name__ == wrapped
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    assert saved and all(n.startswith("item_encoder.projection.") for n in saved)
    assert untrained["parameters"]["trainable"] == sum(t.numel() for t in saved.values())


def test_lora_on_the_backbone_and_the_output_head_together(text_base, target_dir, tmp_path):
    run_dir, cache = text_base
    run = tmp_path / "both"
    metrics = finetune(("lora",), "--pretrained", str(run_dir), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "1", "--adapt", "both",
                       "--target-modules", "q_proj,v_proj,projection", "--rank", "2",
                       "--encoder-cache-dir", str(cache))
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    wrapped = {n.rsplit(".lora_", 1)[0] for n in saved}
    assert wrapped == {"item_encoder.projection"} | {
        f"backbone.layers.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


@pytest.mark.parametrize("extra, message", [
    (["--sites", "projection", "--layers", "top:2"], "K must be between 1 and 1"),
    # attn is in the transformer layers, which then run in the step and have no head site
    (["--sites", "attn,projection"], "unknown adapter site(s) 'projection'"),
])
def test_bad_head_placement_fails_before_training(text_base, target_dir, tmp_path, extra,
                                                  message):
    run_dir, cache = text_base
    run = tmp_path / "bad"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune(HOULSBY, "--pretrained", str(run_dir), "--dataset", str(target_dir),
                 "--output-dir", str(run), "--adapt", "item_encoder",
                 "--encoder-cache-dir", str(cache), *extra)
    assert not (run / "config.json").exists()


def _full(id_base, target_dir, run, *argv: str) -> dict:
    return finetune((), "--pretrained", str(id_base), "--dataset", str(target_dir),
                    "--output-dir", str(run), "--patience", "9", *argv)


def _weights_after_each_epoch(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The model's weights at the end of every epoch trained from now on."""
    from peftrec.pretraining import Trainer

    snapshots, original = [], Trainer._end_epoch

    def end_epoch(self, *args):
        model = self.accelerator.unwrap_model(self.model)
        snapshots.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        original(self, *args)

    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)
    return snapshots


def test_freeze_embeddings_keeps_the_pretrained_ones_and_trains_the_rest(
        id_base, target_dir, tmp_path, initial_weights):
    """Positions stay as pretrained; the item table (fresh for the new catalog) and every
    other parameter train."""
    metrics = _full(id_base, target_dir, tmp_path / "run", "--epochs", "1",
                    "--freeze", "embeddings")
    assert 0 < metrics["parameters"]["trainable_percent"] < 100
    base = load_file(id_base / "best_model" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "state" / "model.safetensors")
    name = "backbone.position_embedding.weight"
    assert torch.equal(trained[name], base[name])
    for name in ("item_encoder.embedding.weight", "backbone.layers.0.attention.q_proj.weight",
                 "backbone.final_norm.weight"):
        assert not torch.equal(trained[name], initial_weights[name]), name
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["transfer"]["freeze"] == ["embeddings"]


@pytest.mark.parametrize(("extra", "message"), [
    (("--freeze", "embeddings", "--from-scratch"), "--freeze: a strategy of fine-tuning"),
    (("--unfreeze-every", "1", "--from-scratch"), "--unfreeze-every: a strategy of"),
    (("--freeze", "weights"), "unknown --freeze group(s) 'weights'"),
])
def test_full_finetuning_strategies_are_refused_where_they_mean_nothing(
        id_base, target_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _full(id_base, target_dir, tmp_path / "run", "--epochs", "1", *extra)
    assert not (tmp_path / "run").exists()


def test_progressive_unfreezing_trains_one_more_layer_each_stage_and_resumes_exactly(
        id_base, target_dir, tmp_path, monkeypatch, initial_weights):
    """Two layers, --unfreeze-every 1: epoch 1 trains the top layer, the final norm and the
    item table; epoch 2 the bottom layer too; epoch 3 the position embeddings too. A run
    killed after epoch 1 and resumed ends with the same weights."""
    from peftrec.pretraining import Trainer

    argv = ["--epochs", "3", "--unfreeze-every", "1"]
    snapshots = _weights_after_each_epoch(monkeypatch)
    _full(id_base, target_dir, tmp_path / "full", *argv)
    assert len(snapshots) == 3
    groups = {"top": "backbone.layers.1.", "bottom": "backbone.layers.0.",
              "positions": "backbone.position_embedding.", "norm": "backbone.final_norm.",
              "items": "item_encoder.embedding."}
    trains_from = {"top": 0, "norm": 0, "items": 0, "bottom": 1, "positions": 2}

    def changed(before: dict, after: dict) -> set[str]:
        return {group for group, prefix in groups.items()
                if any(not torch.equal(before[n], after[n]) for n in after
                       if n.startswith(prefix))}

    for epoch, (before, after) in enumerate(zip([initial_weights, *snapshots], snapshots,
                                                strict=False)):
        assert changed(before, after) == {g for g, e in trains_from.items() if e <= epoch}, epoch

    original = Trainer._save_state

    def save_then_crash(self):
        original(self)
        if self.state.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _full(id_base, target_dir, tmp_path / "split", *argv)
    monkeypatch.setattr(Trainer, "_save_state", original)
    _full(id_base, target_dir, tmp_path / "split", *argv, "--resume")
    full = load_file(tmp_path / "full" / "state" / "model.safetensors")
    split = load_file(tmp_path / "split" / "state" / "model.safetensors")
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0)
