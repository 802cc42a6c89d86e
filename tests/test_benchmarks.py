"""The benchmark scripts' own logic (they train nothing here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import transfer  # noqa: E402


def write_run(folder: Path, backbone: str, item_encoder: str) -> Path:
    folder.mkdir()
    model = {"backbone": backbone, "item_encoder": item_encoder}
    (folder / "config.json").write_text(json.dumps({"model": model}))
    return folder


@pytest.mark.parametrize(("backbone", "item_encoder", "kind"), [
    ("sasrec", "id", "id"), ("sasrec", "text", "text"), ("sasrec", "image", "image"),
    ("diffrec", "id", "diffrec"), ("diffrec", "text", "diffrec"),
])
def test_transfer_source_kind_follows_the_run_config(tmp_path, backbone, item_encoder, kind):
    assert transfer.source_kind(write_run(tmp_path / "run", backbone, item_encoder)) == kind


def test_scale_evaluation_models_are_the_variants_named(tmp_path):
    """benchmarks/scale.py's evaluation models: ID vectors, with the repeat bias, and a frozen
    text encoder whose cache holds synthetic vectors, written by the first build and loaded
    by the next (the encoder itself never runs)."""
    cpu = torch.device("cpu")
    plain, repeat = (scale._model(50, "full", cpu, variant) for variant in ("id", "id+repeat-bias"))
    assert not plain.config.repeat_bias and repeat.config.repeat_bias
    first = scale._model(50, "full", cpu, "text", str(tmp_path))
    assert first.config.item_encoder == "text" and first.item_encoder.encoder is None
    assert torch.equal(first.item_encoder.outputs, scale._synthetic_outputs(first.item_encoder))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    with mock.patch.object(scale, "_synthetic_outputs", side_effect=AssertionError("rebuilt")):
        second = scale._model(50, "full", cpu, "text", str(tmp_path))
    assert torch.equal(second.item_encoder.outputs, first.item_encoder.outputs)


def test_transfer_source_that_is_not_a_run_folder_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a pretraining run folder"):
        transfer.source_kind(tmp_path)


def test_transfer_summary_reads_every_source(tmp_path, monkeypatch):
    """Several sources in one call: each keeps its own kind (the grid loop once rebound
    the per-source lookup, so a second source failed)."""
    id_run = write_run(tmp_path / "id", "sasrec", "id")
    text_run = write_run(tmp_path / "text", "sasrec", "text")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["transfer.py", "--source", f"id={id_run}", "--source",
                                      f"text={text_run}", "--summary-only", "--output-dir",
                                      str(out)])
    transfer.main()
    assert json.loads((out / "results.json").read_text()) == []


import content_vs_id  # noqa: E402
import results  # noqa: E402


def row(source: str, method: str, ndcg: list[float], percent: float,
        valid: list[float] | None = None) -> dict:
    """A summary row; validation scores default to the test ones."""
    return {"source": source, "method": method, "ndcg": ndcg, "valid": valid or ndcg,
            "percent": percent, "trainable %": f"{percent:.2f}"}


def test_transfer_targets_take_the_best_small_adapter_against_full_and_scratch():
    rows = [row("id", "scratch", [0.05, 0.05], 100), row("id", "full fine-tuning", [0.06], 100),
            row("id", "full fine-tuning matched", [0.07], 100),
            row("id", "houlsby big", [0.09], 40.0),  # better, but trains too much
            row("id", "houlsby small", [0.071, 0.069], 4.0),
            # the best test score of the small ones, but not on validation
            row("id", "lora small", [0.08], 3.0, valid=[0.06]),
            row("-", "popularity", [0.01], 0.0), row("id", "zero-shot matched", [0.03], 0.0)]
    lines = transfer.check_targets(rows)
    assert lines[0].startswith("id: zero-shot matched 0.0300 = 3.00x popularity") and \
        lines[0].endswith("-> met (target >= 2x)")
    # the reference is the better full fine-tuning; 0.07 / 0.07 = 100%, 0.07 / 0.05 = 1.4x
    assert "houlsby small (4.00%) 0.0700 = 100.0% of full fine-tuning (full fine-tuning " \
        "matched, 0.0700) -> met" in lines[1]
    assert lines[1].endswith("1.40x from scratch (scratch, 0.0500) -> met (target >= 1.1x)")
    # Scratch at another rate is a reference too (never an adapter), chosen on validation.
    rows.append(row("id", "scratch lr 3e-3", [0.066], 100, valid=[0.07]))
    assert lines[1].replace("1.40x from scratch (scratch, 0.0500) -> met",
                            "1.06x from scratch (scratch lr 3e-3, 0.0660) -> NOT met") \
        == transfer.check_targets(rows)[1]
    rows[4]["ndcg"] = [0.05]
    assert "NOT met (target >= 100%)" in transfer.check_targets(rows)[1]


def test_transfer_rows_with_matched_items_run_only_with_the_fields(tmp_path, monkeypatch):
    source = write_run(tmp_path / "id", "sasrec", "id")
    calls = []
    monkeypatch.setattr(transfer, "run_one", lambda script, flags, *rest: calls.append(flags)
                        or {"test": {"ndcg@10": 0.1, "hr@10": 0.2}})
    monkeypatch.setattr(transfer, "summarize", lambda *a: row("id", a[1], [0.1], 1.0))
    monkeypatch.setattr(transfer, "popularity", lambda target: row("-", "popularity", [0.01], 0))
    argv = ["transfer.py", "--source", f"id={source}", "--seeds", "0", "--output-dir",
            str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    transfer.main()
    assert calls and not any(transfer.MATCH in flags or "--match-items-by" in flags
                             for flags in calls)
    calls.clear()
    monkeypatch.setattr(sys, "argv", [*argv, "--match-items-by", "movie_title,release_year"])
    transfer.main()
    matched = [flags for flags in calls if "--match-items-by" in flags]
    assert matched and all(flags[flags.index("--match-items-by") + 1] ==
                           "movie_title,release_year" for flags in matched)


def test_in_domain_targets_choose_each_family_on_validation():
    rows = [{"model": "id lr 2e-3", "ndcg": [0.10], "valid": [0.11]},
            {"model": "id lr 5e-3", "ndcg": [0.12], "valid": [0.105]},  # worse on validation
            {"model": "text linear", "ndcg": [0.09], "valid": [0.08]},  # best test, not valid
            {"model": "text moe", "ndcg": [0.084], "valid": [0.09]},
            {"model": "text+id sum", "ndcg": [0.101], "valid": [0.12]}]
    lines = content_vs_id.check_targets(rows)
    assert lines[0].startswith("text: text moe (best on validation) test NDCG@10 0.0840 = "
                               "84.0% of id lr 2e-3 (0.1000)")
    assert lines[0].endswith("NOT met (target >= 85%)")
    assert lines[1].startswith("text+id: text+id sum") and "-> met" in lines[1]


def test_results_files_carry_provenance_and_fill_readme_blocks(tmp_path):
    path = results.write_result("pair/table", [{"a": 1}], "| a |\n|---|\n| 1 |",
                                {"target": "x"}, results_dir=tmp_path)
    payload = json.loads(path.with_suffix(".json").read_text())
    assert {"command", "commit", "versions", "device", "date"} <= set(payload)
    assert payload["rows"] == [{"a": 1}] and payload["target"] == "x"
    text = "intro\n<!-- results: pair/table -->\nstale 0.9999\n<!-- /results -->\nend\n"
    rendered = results.render_blocks(text, tmp_path)
    assert "stale" not in rendered and "| 1 |" in rendered and rendered.endswith("end\n")
    assert results.render_blocks(rendered, tmp_path) == rendered
    with pytest.raises(FileNotFoundError, match="no .*missing.md"):
        results.render_blocks("<!-- results: missing -->\n<!-- /results -->", tmp_path)


def test_results_sync_rewrites_readme_and_docs_blocks(tmp_path):
    """One call renders README.md and every docs/*.md: `check` reports the stale files
    and writes nothing, then a sync rewrites them; a missing results file stops it before
    any file is written."""
    results_dir = tmp_path / "results"
    results.write_result("pair/table", [{"a": 1}], "| a |\n|---|\n| 1 |", results_dir=results_dir)
    stale = "<!-- results: pair/table -->\nstale 0.9999\n<!-- /results -->\n"
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    files = {"README.md": stale, "docs/results.md": "# R\n" + stale,
             "docs/deep/more.md": stale, "docs/plain.md": "no blocks\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    report = results.sync(tmp_path, results_dir, check=True)
    assert {p.relative_to(tmp_path).as_posix(): v for p, v in report.items()} == {
        "README.md": (1, True), "docs/results.md": (1, True), "docs/deep/more.md": (1, True)}
    assert (tmp_path / "docs/results.md").read_text() == "# R\n" + stale
    assert all(was_stale for _, was_stale in results.sync(tmp_path, results_dir).values())
    assert not any(was_stale for _, was_stale in results.sync(tmp_path, results_dir).values())
    assert "| 1 |" in (tmp_path / "docs/deep/more.md").read_text()
    assert (tmp_path / "docs/plain.md").read_text() == "no blocks\n"
    (tmp_path / "README.md").write_text(stale)
    (tmp_path / "docs/results.md").write_text("<!-- results: gone -->\n<!-- /results -->\n")
    with pytest.raises(FileNotFoundError, match="docs/results.md: .*no .*gone.md"):
        results.sync(tmp_path, results_dir)
    assert (tmp_path / "README.md").read_text() == stale


def test_docs_hold_results_blocks():
    """The tables the README no longer shows are generated into docs/ (so the sync test
    below covers them), not copied by hand."""
    docs_blocks = [m["name"] for path in results.block_files() if path.parent.name == "docs"
                   for m in results.BLOCK.finditer(path.read_text())]
    assert "transfer/ml-1m-old-to-ml-1m-new" in docs_blocks


@pytest.mark.parametrize("path", results.block_files(),
                         ids=lambda p: str(p.relative_to(results.ROOT)))
def test_results_blocks_match_their_files(path):
    """Every number in a results block of README.md or docs/*.md comes from
    benchmarks/results/ (regenerate with `python benchmarks/results.py`)."""
    text = path.read_text()
    assert results.render_blocks(text) == text, (
        f"{path.relative_to(results.ROOT)} has a stale results block: run "
        "`python benchmarks/results.py`")
