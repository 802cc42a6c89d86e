"""Splitting one log into two item-disjoint domains (dataset_tools.domains, split_domains.py)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from peftrec.dataset_tools import (
    DataError,
    PrepareConfig,
    SplitRule,
    default_template,
    load_dataset_folder,
    prepare_builtin,
    prepare_dataset,
    resolve_dataset,
    split_domains,
)
from tests.helpers import load_script

# item: (title, release_year, genre); genre is multi-valued (spaces or '|').
ITEMS = {
    "i1": ("One", "1980", "Comedy Romance"),
    "i2": ("Two", "1985", "Comedy"),
    "i3": ("Three", "1989", "Drama|War"),
    "i4": ("Four", "1990", "Action Comedy"),  # first value Action: not a comedy here
    "i5": ("Five", "1995", "Action"),
    "i6": ("Six", "2000", "Horror"),
    "i7": ("Seven", "1970", "Drama"),
    "i8": ("Eight", "1999", "Horror"),
}
# Chronological sequences. By genre (Comedy,Drama -> source = i1 i2 i3 i7): u3 keeps one
# source item (i7, seen by nobody else: it vanishes with u3), u4 has no target item, u5
# is too short on both sides.
LOG = {
    "u1": ["i1", "i4", "i2", "i5", "i3", "i6"],
    "u2": ["i2", "i5", "i1", "i6", "i8", "i3"],
    "u3": ["i7", "i4", "i5", "i6"],
    "u4": ["i3", "i1", "i2"],
    "u5": ["i8", "i2", "i6"],
}
GENRES = SplitRule.values("genre", ["Comedy", "Drama"])


def write_log(folder: Path, items: dict = ITEMS, name: str | None = None) -> Path:
    """Prepare the tiny log above (no k-core) into ``folder``; names like ML-1M's fields."""
    raw = folder.parent / f"{folder.name}-raw"
    raw.mkdir(parents=True)
    with (raw / "log.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "ts"])
        for u, (user, seq) in enumerate(LOG.items()):
            for k, item in enumerate(seq):
                w.writerow([user, item, 1_000_000 + 1_000 * u + 10 * k])
    with (raw / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "movie_title", "release_year", "genre"])
        w.writerows([item, *fields] for item, fields in items.items())
    return prepare_dataset(raw / "log.csv", "csv", folder, PrepareConfig(k_core=0),
                           items_path=raw / "items.csv", user_col="user", item_col="item",
                           time_col="ts", name=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_log(tmp_path_factory.mktemp("split") / "tiny")


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_dataset("ml-100k", cache_dir=tmp_path_factory.mktemp("cache"))


def interactions(folder: Path) -> list[tuple[str, str, int]]:
    """(user id, original item id, timestamp) of every interaction, in sequence order."""
    data = load_dataset_folder(folder)
    table = data.sequences.with_format("arrow")[:]
    items = table.column("item_indices").combine_chunks()
    times = table.column("timestamps").combine_chunks().flatten().to_numpy()
    users = np.repeat(np.array(table.column("user_id").to_pylist(), dtype=object),
                      np.diff(np.asarray(items.offsets)))
    ids = np.array(data.items["item_id"], dtype=object)[items.flatten().to_numpy() - 1]
    return list(zip(users.tolist(), ids.tolist(), times.tolist(), strict=True))


def triples(folder: Path) -> Counter:
    return Counter(interactions(folder))


def sequences(folder: Path) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for user, item, t in interactions(folder):
        out.setdefault(user, []).append((item, t))
    return out


def check_split(parent: Path, source: Path, target: Path, rule: SplitRule) -> dict:
    """Every property a split must have; returns the recorded split block."""
    data, src, tgt = (load_dataset_folder(p) for p in (parent, source, target))
    split = src.info["domain_split"]
    assert tgt.info["domain_split"]["domains"] == split["domains"]
    assert (split["side"], tgt.info["domain_split"]["side"]) == ("source", "target")
    assert split["parent"]["fingerprint"] == data.fingerprint
    # Items: disjoint; each parent item in one domain or counted as left without interactions.
    src_items, tgt_items = set(src.items["item_id"]), set(tgt.items["item_id"])
    assert not src_items & tgt_items
    assert len(src_items) == src.num_items and len(tgt_items) == tgt.num_items
    vanished = set(data.items["item_id"]) - src_items - tgt_items
    assert len(vanished) == sum(d.info["statistics"]["dropped"]["items_without_interactions"]
                                for d in (src, tgt))
    for d in (src, tgt):
        stats = d.info["statistics"]
        assert stats["dropped"]["input_interactions"] == data.info["statistics"]["interactions"]
        lengths = [len(s) for s in d.sequences["item_indices"]]
        assert min(lengths) >= 3 and sum(lengths) == stats["interactions"]
        assert sorted({i for s in d.sequences["item_indices"] for i in s}) == list(
            range(1, d.num_items + 1))  # re-indexed from 1, no gaps
        assert d.items.column_names == data.items.column_names
    # Interactions: kept ones are parent interactions; the rest are the recorded drops.
    whole, kept_src, kept_tgt = triples(parent), triples(source), triples(target)
    assert not (kept_src + kept_tgt) - whole
    dropped = whole - kept_src - kept_tgt
    assert sum(dropped.values()) == split["dropped_interactions"]
    assert src.info["statistics"]["interactions"] + tgt.info["statistics"]["interactions"] \
        + split["dropped_interactions"] == data.info["statistics"]["interactions"]
    # Each domain's sequence is the parent's, filtered to its items (order, timestamps).
    parent_seqs = sequences(parent)
    for folder, items in ((source, src_items), (target, tgt_items)):
        for user, seq in sequences(folder).items():
            assert seq == [(i, t) for i, t in parent_seqs[user] if i in items]
    # What was dropped: all of a user's interactions in a domain, fewer than 3 of them.
    assigned = dict(zip(data.items["item_id"], rule.assign(data.items.to_pandas()), strict=True))
    assert {i for i, to_source in assigned.items() if to_source} >= src_items
    assert not {i for i, to_source in assigned.items() if to_source} & tgt_items
    in_domain = Counter((u, assigned[i]) for (u, i, _), n in whole.items() for _ in range(n))
    lost = Counter((u, assigned[i]) for (u, i, _), n in dropped.items() for _ in range(n))
    assert all(n == in_domain[key] < 3 for key, n in lost.items())
    return split


def test_split_by_first_value_of_a_multi_valued_field(tiny: Path, tmp_path: Path):
    source, target = split_domains(tiny, tmp_path / "src", tmp_path / "tgt", GENRES)
    split = check_split(tiny, source, target, GENRES)
    src, tgt = load_dataset_folder(source), load_dataset_folder(target)
    assert src.name == "src" and tgt.name == "tgt"  # default: the folder's name
    assert sorted(src.items["item_id"]) == ["i1", "i2", "i3"]  # i7 left with u3
    assert sorted(tgt.items["item_id"]) == ["i4", "i5", "i6", "i8"]
    assert src.items["item_id"][0] == "i1"  # index 1 = first item of the first user
    assert sorted(src.sequences["user_id"]) == ["u1", "u2", "u4"]
    assert sorted(tgt.sequences["user_id"]) == ["u1", "u2", "u3"]
    assert split["field"] == "genre" and split["rule"]["source_values"] == ["Comedy", "Drama"]
    assert split["users_in_both"] == 2
    assert split["domains"]["source"] | {"fingerprint": None} == {
        "name": "src", "fingerprint": None, "assigned_items": 4, "users": 3, "items": 3,
        "interactions": 9, "dropped_users": 2, "dropped_interactions": 2,
        "items_without_interactions": 1}
    assert split["domains"]["target"]["dropped_interactions"] == 2  # u5's i8, i6
    assert split["dropped_interactions"] == 4  # 9 + 9 + 4 = 22 interactions of the log


def test_split_by_half_open_numeric_range(tiny: Path, tmp_path: Path):
    rule = SplitRule.parse_range("release_year", "1985,1995")
    source, target = split_domains(tiny, tmp_path / "s", tmp_path / "t", rule)
    check_split(tiny, source, target, rule)
    # 1985 <= year < 1995: i2 i3 i4 (1995 = upper bound -> target).
    assert sorted(load_dataset_folder(source).items["item_id"]) == ["i2", "i3", "i4"]
    assert sorted(load_dataset_folder(target).items["item_id"]) == ["i1", "i5", "i6", "i7",
                                                                     "i8"]
    assert SplitRule.parse_range("f", ",1990") == SplitRule.range("f", None, 1990.0)
    assert SplitRule.parse_range("f", " 1990 , ") == SplitRule.range("f", 1990.0, None)


def test_split_is_deterministic(tiny: Path, tmp_path: Path):
    runs = [split_domains(tiny, tmp_path / f"s{k}", tmp_path / f"t{k}", GENRES,
                          source_name="s", target_name="t") for k in range(2)]
    for side in range(2):
        first, second = (json.loads((run[side] / "dataset_info.json").read_text())
                         for run in runs)
        assert first == second
        a, b = (load_dataset_folder(run[side]) for run in runs)
        assert a.sequences.data.table.equals(b.sequences.data.table)
        assert a.items.data.table.equals(b.items.data.table)


def test_ml100k_split_by_genre_and_non_numeric_years(ml100k: Path, tmp_path: Path):
    rule = SplitRule.values("class", ["Comedy", "Drama"])
    source, target = split_domains(ml100k, tmp_path / "s", tmp_path / "t", rule)
    check_split(ml100k, source, target, rule)
    firsts = {c.split()[0] for c in load_dataset_folder(source).items["class"]}
    assert firsts == {"Comedy", "Drama"}
    # Two ML-100k items have no numeric year ('unkonwn', 'V'): a range split refuses them.
    with pytest.raises(DataError, match=r"'release_year': 2 of 1341 items .*'unkonwn'"):
        split_domains(ml100k, tmp_path / "a", tmp_path / "b",
                      SplitRule.parse_range("release_year", ",1990"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(("rule", "message"), [
    (SplitRule.values("year", ["1990"]),
     r"--field 'year' is not a column .* it has: item_id, movie_title, release_year, genre"),
    (SplitRule.values("genre", ["Western"]),
     r"the source domain would have no items \(0 of 8\).*first values present: .*Comedy"),
    (SplitRule.parse_range("release_year", "1900,"),
     r"the target domain would have no items \(0 of 8\): release_year >= 1900"),
    # Drama = i3 (u1, u2, u4) and i7 (u3): four users with one interaction each.
    (SplitRule.values("genre", ["Drama"]),
     r"the source domain .* keeps no user with >= 3 interactions: its 2 items have 4 "
     r"interactions from 4 users"),
])
def test_bad_split_names_the_problem_and_writes_nothing(tiny: Path, tmp_path: Path,
                                                        rule: SplitRule, message: str):
    with pytest.raises(DataError, match=message):
        split_domains(tiny, tmp_path / "out" / "s", tmp_path / "out" / "t", rule)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_non_numeric_value_names_field_and_count(tmp_path: Path):
    items = {**ITEMS, "i5": ("Five", "unknown", "Action"), "i6": ("Six", "", "Horror")}
    parent = write_log(tmp_path / "parent", items)
    with pytest.raises(DataError, match=r"--field 'release_year': 2 of 8 items have a "
                                        r"non-numeric value \('unknown' \(item 'i5'\), ''"):
        split_domains(parent, tmp_path / "s", tmp_path / "t",
                      SplitRule.parse_range("release_year", ",1990"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


@pytest.mark.parametrize("text", ["1990", ",", "a,1990", "1990,1980", "1,2,3", "nan,"])
def test_bad_range_syntax(text: str):
    with pytest.raises(DataError, match="--source-range"):
        SplitRule.parse_range("release_year", text)


def test_outputs_must_differ(tiny: Path, tmp_path: Path):
    with pytest.raises(DataError, match="same folder"):
        split_domains(tiny, tmp_path / "x", tmp_path / "x", GENRES)
    with pytest.raises(DataError, match="cannot be the input"):
        split_domains(tiny, tiny, tmp_path / "x", GENRES)
    assert not (tmp_path / "x").exists()


def test_script_end_to_end(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    script = load_script("split_domains")
    args = ["--dataset", str(tiny), "--field", "genre", "--source-values", "Comedy,Drama",
            "--source-output", str(tmp_path / "comedy"), "--target-output",
            str(tmp_path / "other"), "--target-name", "others"]
    script.main(args)
    out = capsys.readouterr().out
    assert "users in both domains: 2 of 5" in out and "comedy" in out
    source, target = (load_dataset_folder(tmp_path / n) for n in ("comedy", "other"))
    assert (source.name, target.name) == ("comedy", "others")
    assert (source.num_items, target.num_items) == (3, 4)
    check_split(tiny, tmp_path / "comedy", tmp_path / "other", GENRES)
    # Bad input: one line on stderr, exit status 2, nothing written.
    bad = [*args[:2], "--field", "year", "--source-range", ",1990",
           "--source-output", str(tmp_path / "a"), "--target-output", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as exit_info:
        script.run_main(script.main, bad)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'year'" in err and "release_year" in err
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):  # a rule is required
        script.main(args[:4] + args[6:])


def test_builtin_pair_is_the_split_of_whatever_ml1m_resolves_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A tiny stand-in for the cached ML-1M (same item fields), so nothing slow is prepared.
    parent = write_log(tmp_path / "datasets" / "ml-1m-5core", name="ml-1m")
    assert resolve_dataset("ml-1m", cache_dir=tmp_path) == parent
    old = resolve_dataset("ml-1m-old", cache_dir=tmp_path)
    assert old == tmp_path / "datasets" / "ml-1m-old-5core"
    new = tmp_path / "datasets" / "ml-1m-new-5core"  # written with it, from one computation
    split = check_split(parent, old, new, SplitRule.parse_range("release_year", ",1990"))
    assert split["field"] == "release_year" and split["rule"]["source_range"] == [None, 1990]
    old_data, new_data = load_dataset_folder(old), load_dataset_folder(new)
    assert (old_data.name, new_data.name) == ("ml-1m-old", "ml-1m-new")
    assert all(int(y) < 1990 for y in old_data.items["release_year"])
    assert all(int(y) >= 1990 for y in new_data.items["release_year"])
    # Reused afterwards, like any built-in, from --dataset or $PEFTREC_CACHE.
    monkeypatch.setattr("peftrec.dataset_tools.builtin.split_domains",
                        lambda *a, **k: pytest.fail("split twice"))
    monkeypatch.setenv("PEFTREC_CACHE", str(tmp_path))
    assert resolve_dataset("ml-1m-new") == new
    # prepare_builtin (prepare_data.py --dataset ml-1m-old) writes the same folder elsewhere.
    copy = prepare_builtin("ml-1m-old", tmp_path / "copy")
    assert load_dataset_folder(copy).fingerprint == old_data.fingerprint
    # The text model finds ML-1M's template for both names, and it renders their items.
    for data in (old_data, new_data):
        texts = default_template(data.name).render(data.items.to_pandas())
        assert texts[0].startswith(data.items["movie_title"][0])
    prepare_data = load_script("prepare_data")
    prepare_data.main(["--dataset", "ml-1m-new", "--output", str(tmp_path / "p")])
    assert load_dataset_folder(tmp_path / "p").fingerprint == new_data.fingerprint
    with pytest.raises(DataError, match=r"built-in domain split \(ml-1m-new, ml-1m-old\)"):
        resolve_dataset("ml-1m-older", cache_dir=tmp_path)
