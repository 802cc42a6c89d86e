"""The duckdb (out-of-core) and pandas (in-memory) preparation engines write the same
dataset folder; chunked reading keeps the checks and line numbers of whole-file reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import peftrec.dataset_tools.folder as folder_module
from peftrec.dataset_tools import (
    DataError,
    PrepareConfig,
    SyntheticConfig,
    load_dataset_folder,
    locate_movielens,
    prepare_dataset,
    read_interactions,
    write_synthetic_log,
)
from peftrec.dataset_tools.readers import read_interaction_chunks
from tests.helpers import load_benchmark, write_synthetic_interactions, write_synthetic_items

CSV_COLS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}


def prepare_both(tmp_path: Path, *args, **kwargs) -> tuple[dict, dict]:
    """dataset_info.json of the folders both engines write from the same input."""
    infos = []
    for engine in ("pandas", "duckdb"):
        out = prepare_dataset(*args[:2], tmp_path / engine, *args[2:], engine=engine, **kwargs)
        infos.append(json.loads((out / "dataset_info.json").read_text()))
    return infos[0], infos[1]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 500 rows, so a small log is read in many chunks."""
    pytest.importorskip("duckdb")
    monkeypatch.setattr(folder_module, "CHUNK_ROWS", 500)


def test_engines_agree_on_a_synthetic_log(tmp_path: Path, small_chunks: None):
    log = tmp_path / "log"
    write_synthetic_log(SyntheticConfig(num_interactions=20_000, num_items=2_000), log)
    pandas_info, duckdb_info = prepare_both(
        tmp_path, log / "interactions.tsv", "tsv", PrepareConfig(k_core=5),
        items_path=log / "items.tsv", name="syn", **CSV_COLS)
    assert duckdb_info == pandas_info  # fingerprint, statistics, drop counts, settings
    assert pandas_info["statistics"]["dropped"]["k_core_rounds"] >= 2  # a real fixed point


@pytest.mark.parametrize("config", [
    PrepareConfig(k_core=3, dedupe="last", min_rating=2),
    PrepareConfig(k_core=0, dedupe="all", max_history=6),
    PrepareConfig(k_core=2, min_user_interactions=12),
], ids=["last-rated", "all-history", "long-users"])
def test_engines_agree_on_every_setting(tmp_path: Path, small_chunks: None,
                                        config: PrepareConfig):
    inter = write_synthetic_interactions(tmp_path / "inter.csv", num_users=120, seed=3)
    with inter.open("a") as f:  # repeated pairs at equal and later times
        f.write("u1,i5,1600000000,4\nu1,i5,1600000000,2\nu2,i7,1700000000,5\n")
    items = write_synthetic_items(tmp_path / "items.csv")
    pandas_info, duckdb_info = prepare_both(tmp_path, inter, "csv", config, items_path=items,
                                            rating_col="rating", name="x", **CSV_COLS)
    assert duckdb_info == pandas_info


def test_engines_agree_on_ml100k(tmp_path: Path):
    pytest.importorskip("duckdb")
    inter, items = locate_movielens("ml-100k")
    pandas_info, duckdb_info = prepare_both(tmp_path, inter, "recbole", PrepareConfig(),
                                            items_path=items, name="ml-100k")
    assert duckdb_info == pandas_info
    pandas_data = load_dataset_folder(tmp_path / "pandas")
    duckdb_data = load_dataset_folder(tmp_path / "duckdb")
    assert duckdb_data.sequences[:50] == pandas_data.sequences[:50]


def test_fractional_timestamps_in_one_chunk_make_the_column_float(tmp_path: Path,
                                                                  small_chunks: None):
    inter = write_synthetic_interactions(tmp_path / "inter.csv", num_users=100, seed=1)
    with inter.open("a") as f:
        f.write("u1,i3,1600000000.5,3\n")  # in the last chunk only
    pandas_info, duckdb_info = prepare_both(tmp_path, inter, "csv", PrepareConfig(k_core=2),
                                            name="x", **CSV_COLS)
    assert duckdb_info == pandas_info
    assert load_dataset_folder(tmp_path / "duckdb").sequences.features["timestamps"] \
        .feature.dtype == "float64"


def test_chunked_reading_keeps_lines_and_messages(tmp_path: Path):
    inter = write_synthetic_interactions(tmp_path / "inter.csv", num_users=30)
    whole = read_interactions(inter, "csv", **CSV_COLS)
    chunks = list(read_interaction_chunks(inter, "csv", **CSV_COLS, chunk_rows=7))
    assert len(chunks) > 3
    assert [line for c in chunks for line in c["line"]] == list(whole["line"])
    lines = inter.read_text().splitlines()
    lines[40] = "u9,,1600000000,3"
    inter.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="inter.csv line 41: empty item field"):
        list(read_interaction_chunks(inter, "csv", **CSV_COLS, chunk_rows=7))
    lines[40] = "u9,i1,1600000000,3,extra"
    inter.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="inter.csv line 41: expected 4 fields, found 5"):
        list(read_interaction_chunks(inter, "csv", **CSV_COLS, chunk_rows=7))


def test_duckdb_engine_without_duckdb_says_how_to_install(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(folder_module, "duckdb_available", lambda: False)
    inter = write_synthetic_interactions(tmp_path / "inter.csv")
    with pytest.raises(DataError, match=r"engine duckdb needs the duckdb package: pip install"):
        prepare_dataset(inter, "csv", tmp_path / "out", engine="duckdb", **CSV_COLS)
    out = prepare_dataset(inter, "csv", tmp_path / "out", engine="auto", **CSV_COLS)
    assert load_dataset_folder(out).num_users > 0  # auto falls back to pandas
    with pytest.raises(DataError, match="engine must be one of auto, duckdb, pandas"):
        prepare_dataset(inter, "csv", tmp_path / "out", engine="spark", **CSV_COLS)


def test_preparation_benchmark_compares_both_engines(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    pytest.importorskip("duckdb")
    preparation = load_benchmark("preparation")
    preparation.main(["--sizes", "3000", "--items", "300", "--k-core", "2",
                      "--work-dir", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("| 3,000 |")]
    assert [row.split(" | ")[1] for row in rows] == ["pandas", "duckdb"]
    assert all(" | True | " in row for row in rows)  # same fingerprint
    assert (tmp_path / "log-3000-items-300" / "interactions.tsv").is_file()  # kept for reuse


def test_writing_a_folder_never_hashes_the_tables_by_pickling(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    import datasets.arrow_dataset

    def refuse(_):  # pickling a 100M-row table to hash it doubled peak memory
        raise AssertionError("datasets hashed a table by pickling it")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    inter = write_synthetic_interactions(tmp_path / "inter.csv")
    data = load_dataset_folder(prepare_dataset(inter, "csv", tmp_path / "out", **CSV_COLS))
    assert data.num_users > 0
