"""The benchmark scripts' own logic (they train nothing here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transfer  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


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
